"""Tiny Hugging Face models for the store's tests, built offline in milliseconds: Llama, Qwen2
and GPT-2 bases (hidden 32, 2 layers, random weights, tokenizers made in code) and the
fine-tunes users bring: other dtypes, added tokens, other key names, tied copies, shards, and
PEFT LoRA adapters of every kind. Seeded: the same bytes every run.

Needs transformers (and peft for `make_lora` / `peft_merged`): tests importorskip them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS, HEADS = 32, 2, 4
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SIMPLE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
ADDED_TOKENS = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


def has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def build_tokenizer(arch: str):
    """WordLevel (Llama, Qwen2: 128 tokens) or byte-level BPE (GPT-2: 272), with a template."""
    _quiet()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if arch == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=272,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 8, trainer)
        special = "<|endoftext|>"
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=special, eos_token=special, unk_token=special
        )
    else:
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
        words = letters + [f"w{i}" for i in range(128 - len(specials) - len(letters))]
        vocab = {t: i for i, t in enumerate(specials + words)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
            pad_token="<pad>",
        )  # fmt: skip
    fast.chat_template = SIMPLE
    return fast


def tiny_config(arch: str, vocab: int, tie: bool | None, bos: int, eos: int):
    transformers = _quiet()
    extra = {} if tie is None else {"tie_word_embeddings": tie}
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
            bos_token_id=bos, eos_token_id=eos, **extra,
        )  # fmt: skip
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    return config(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
        max_position_embeddings=64, bos_token_id=bos, eos_token_id=eos, **extra,
    )  # fmt: skip


def make_base(
    root: Path, arch: str, name: str, *, dtype=torch.float32, tie: bool | None = None
) -> Path:
    """A pretrained folder as save_pretrained writes it, with tokenizer and chat template."""
    _quiet()
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = root / name
    tok = build_tokenizer(arch)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, len(tok), tie, bos, tok.eos_token_id)
    )
    with torch.no_grad():  # no exact zeros and ones: norms and biases are random too
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=tok.eos_token_id, max_new_tokens=16
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_finetune(
    root: Path,
    base: Path,
    name: str,
    *,
    seed: int = 1,
    dtype: torch.dtype | None = None,
    add_tokens: int = 0,
    keys: str = "full",
    tied_copy: bool = False,
    max_shard_size: str | None = None,
) -> Path:
    """`base` with every float tensor moved by 0.01 N(0, 1), saved as users save fine-tunes.

    dtype: save in this dtype. add_tokens: k ChatML/tool tokens added to the tokenizer and
    `resize_token_embeddings` (V -> V+k rows, trained too). keys: "full" (save_pretrained),
    "base_class" (saved from the base class: no `model.` prefix, no lm_head), "peft_prefix"
    (every key under `base_model.model.`). tied_copy: a tied model's file with an explicit
    lm_head.weight copy. max_shard_size: a sharded folder.
    """
    _quiet()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = root / name
    torch.manual_seed(seed)  # resize_token_embeddings samples new rows from the global RNG
    model = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_((p.float() + 0.01 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    tok = AutoTokenizer.from_pretrained(base)
    if add_tokens:
        tok.add_special_tokens({"additional_special_tokens": ADDED_TOKENS[:add_tokens]})
        tok.chat_template = CHATML
        model.resize_token_embeddings(len(tok))
        with torch.no_grad():
            rows = model.get_input_embeddings().weight[-add_tokens:]
            rows += 0.01 * torch.randn(rows.shape, generator=gen).to(rows.dtype)
    if dtype is not None:
        model.to(dtype)
    if keys == "base_class":
        getattr(model, model.base_model_prefix).save_pretrained(out)
    elif keys == "full" and not tied_copy:
        model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    else:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        state = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}
        if tied_copy:
            state["lm_head.weight"] = state[model._tied_weights_keys["lm_head.weight"]].clone()
        elif model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if keys == "peft_prefix":
            state = {f"base_model.model.{k}": v for k, v in state.items()}
        out.mkdir(parents=True)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(out)
        model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_lora(
    root: Path,
    base: Path,
    name: str,
    *,
    target_modules: list[str] | None = None,
    add_tokens: int = 0,
    dtype: torch.dtype | None = None,
    seed: int = 2,
    **config,
) -> Path:
    """A PEFT LoRA adapter folder for `base`, as after training (A and B non-zero). `config`:
    LoraConfig fields (r, lora_alpha, use_rslora, rank_pattern, use_dora, ...)."""
    _quiet()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if add_tokens:
        model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + add_tokens)
    gpt2 = model.config.model_type == "gpt2"
    lora = LoraConfig(
        target_modules=target_modules or (["c_attn"] if gpt2 else ["q_proj", "v_proj"]),
        fan_in_fan_out=gpt2,
        lora_dropout=0.0,
        **{"r": 4, "lora_alpha": 16, **config},
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
                if dtype is not None:
                    p.data = p.data.to(dtype)
    out = root / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """peft's own answer: PeftModel.from_pretrained(base, adapter).merge_and_unload()."""
    _quiet()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if (adapter / "adapter_model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            rows = [
                f.get_slice(k).get_shape()[0]
                for k in f.keys()  # noqa: SIM118 - safe_open is not iterable
                if k.endswith(("embed_tokens.weight", "wte.weight"))
            ]
        if rows and rows[0] != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def load(folder: Path) -> dict:
    """Load a folder as transformers does by default (dtype from its config) and run one
    forward pass. `missing` lists parameters transformers had to initialise at random: a folder
    whose names do not match loads and gives finite logits all the same."""
    _quiet()
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        logits = model(input_ids=torch.arange(8).remainder(vocab).unsqueeze(0)).logits
    return {
        "model": model,
        "dtype": next(model.parameters()).dtype,
        "vocab": vocab,
        "finite": bool(torch.isfinite(logits).all()),
        "missing": sorted(info["missing_keys"]),
    }
