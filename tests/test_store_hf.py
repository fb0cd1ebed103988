"""The store on real Hugging Face formats: every kind of fine-tune users bring packs, inspects,
merges and extracts into a folder transformers loads, holding the right weights.

Tiny Llama, Qwen2 and GPT-2 models are built in the test (tests/hf_models.py). Loading and a
finite forward pass prove little alone (a folder whose names do not match loads with random
weights and finite logits), so every extracted folder is also checked for missing keys, for
the loaded state being the written one, and for the written one being the fine-tune.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tvq_cli
from tvq_cli import PackOptions
from tvq_cli.merge import MergeRequest, merge

pytest.importorskip("transformers")
import hf_models  # noqa: E402 - needs transformers

HAS_PEFT = hf_models.has_peft()
EXACT = PackOptions(keep=("*",))  # fp32 deltas: extraction gives the fine-tune back exactly

# base -> task -> how to build it; LoRA tasks need peft
BASES = {
    "llama": {"arch": "llama"},
    "llama-bf16": {"arch": "llama", "dtype": torch.bfloat16},
    "llama-tied": {"arch": "llama", "tie": True},
    "gpt2": {"arch": "gpt2"},
    "qwen2": {"arch": "qwen2"},
}
TASKS = {
    "llama": {
        "bf16": {"dtype": torch.bfloat16},
        "added": {"add_tokens": 2},
        "base-class": {"keys": "base_class"},
        "peft-prefix": {"keys": "peft_prefix"},
        "sharded": {"max_shard_size": "20KB"},
        "mein Modell ü": {},
        "lora": {"lora": {}},
        "lora-rslora": {"lora": {"r": 8, "lora_alpha": 4, "use_rslora": True}},
        "lora-patterns": {
            "lora": {
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                "lora_alpha": 8,
                "rank_pattern": {"model.layers.1.self_attn.q_proj": 2},
                "alpha_pattern": {"down_proj": 3},
            }
        },
        "lora-mts": {"lora": {"modules_to_save": ["lm_head"]}},
        "lora-dora": {"lora": {"use_dora": True}},
        "lora-bf16": {"lora": {"dtype": torch.bfloat16}},
        "lora-added": {"lora": {"add_tokens": 2}},
        "lora-embed": {"lora": {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}},
        "lora-tokens": {"lora": {"trainable_token_indices": {"embed_tokens": [3, 5]}}},
    },
    "llama-bf16": {"fp32": {"dtype": torch.float32}},
    "llama-tied": {
        "tied": {},
        "tied-copy": {"tied_copy": True},
        "tied-added": {"add_tokens": 2},
    },
    "gpt2": {
        "tied-copy": {"tied_copy": True},
        "added": {"add_tokens": 2},
        "lora": {"lora": {}},
        "lora-dora": {"lora": {"use_dora": True}},
    },
    "qwen2": {"ft": {}, "lora-bias": {"lora": {"lora_bias": True}}},
}
CASES = [
    (base, task)
    for base, tasks in TASKS.items()
    for task, how in tasks.items()
    if HAS_PEFT or "lora" not in how
]
TASK_NAMES = {"mein Modell ü": "mein_Modell_ü"}  # sanitised from the folder name
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
LEFT_OUT = {  # rows of added tokens a merge leaves out: (task, tensor, rows)
    "llama": {("added", EMBED, 2), ("added", HEAD, 2), ("lora-added", EMBED, 2)}
    | {("lora-added", HEAD, 2)},
    "llama-tied": {("tied-added", EMBED, 2)},
    "gpt2": {("added", "transformer.wte.weight", 2)},
}


def task_name(task: str) -> str:
    return TASK_NAMES.get(task, task)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Every base, its fine-tunes, and two archives of them: exact and 4-bit (defaults)."""
    root = tmp_path_factory.mktemp("hf")
    made: dict = {}
    for base_name, spec in BASES.items():
        folder = root / base_name
        folder.mkdir()
        arch = spec["arch"]
        base = hf_models.make_base(
            folder, arch, "base", dtype=spec.get("dtype", torch.float32), tie=spec.get("tie")
        )
        tasks = {}
        for seed, (task, how) in enumerate(TASKS[base_name].items(), start=1):
            if "lora" in how:
                if not HAS_PEFT:
                    continue
                tasks[task] = hf_models.make_lora(folder, base, task, seed=seed, **how["lora"])
            else:
                tasks[task] = hf_models.make_finetune(folder, base, task, seed=seed, **how)
        archives = {}
        for kind, options in (("exact", EXACT), ("quantized", PackOptions())):
            archives[kind] = folder / f"{kind}.tvq"
            result = tvq_cli.pack(base, list(tasks.values()), archives[kind], options)
        made[base_name] = {
            "base": base,
            "tasks": tasks,
            "archives": archives,
            "notes": result.notes,
        }
    return made


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def original_state(folder: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fine-tune's own tensors under the pretrained names (mapped here independently)."""
    out = {}
    for name, tensor in read_folder(folder).items():
        name = name.removeprefix("base_model.model.")
        for prefix in ("", "model.", "transformer."):
            if prefix + name in base or name == "lm_head.weight":
                out[prefix + name if prefix + name in base else name] = tensor
                break
    return out


@pytest.mark.parametrize(("base_name", "task"), CASES, ids=[f"{b}/{t}" for b, t in CASES])
def test_extracted_fine_tune_loads_with_its_own_weights(store, tmp_path, base_name, task):
    made = store[base_name]
    base, source = made["base"], made["tasks"][task]
    out = tmp_path / "out"
    report = tvq_cli.extract(made["archives"]["exact"], task_name(task), base, out)
    written = read_folder(out)
    pre = read_folder(base)
    if (source / "adapter_config.json").exists():
        expected = hf_models.peft_merged(base, source)
        expected = {n: t.to(pre[n].dtype) if n in pre else t for n, t in expected.items()}
        expected = {n: t for n, t in expected.items() if n in written}
    else:
        expected = original_state(source, pre)
        for name in set(pre) - set(expected):  # saved without its head: the pretrained one
            expected[name] = pre[name]
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype, name
        assert written[name].shape == tensor.shape, name
        torch.testing.assert_close(written[name].float(), tensor.float(), atol=2e-6, rtol=0)
    loaded = hf_models.load(out)
    assert loaded["finite"] and loaded["missing"] == []
    state = loaded["model"].state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), f"{name}: transformers loaded other values"
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == str(loaded["dtype"]).removeprefix("torch.")
    assert config["vocab_size"] == loaded["vocab"]
    tokenizer = source / "tokenizer.json"
    if not tokenizer.exists():  # an adapter without a tokenizer: the pretrained one
        tokenizer = base / "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert report["output"]["format"] == "folder"


@pytest.mark.parametrize(("base_name", "task"), CASES, ids=[f"{b}/{t}" for b, t in CASES])
def test_quantized_extraction_checks_the_original(store, tmp_path, base_name, task):
    """From the 4-bit archive: the original passes the fingerprint check and the error is the
    quantizer's; another task's fine-tune is refused."""
    made = store[base_name]
    archive, base = made["archives"]["quantized"], made["base"]
    report = tvq_cli.extract(
        archive, task_name(task), base, tmp_path / "t.safetensors", against=made["tasks"][task]
    )
    assert report["against"]["fingerprint"] == "match"
    assert report["against"]["rel_l2"] < 0.2
    others = [t for t in made["tasks"] if t != task]
    if others:
        with pytest.raises(tvq_cli.TvqError, match="fingerprints differ"):
            tvq_cli.extract(
                archive, task_name(task), base, tmp_path / "u", against=made["tasks"][others[0]]
            )
        assert not (tmp_path / "u").exists()


@pytest.mark.parametrize("base_name", sorted(BASES))
def test_merge_keeps_the_pretrained_vocabulary_and_loads(store, tmp_path, base_name):
    made = store[base_name]
    out = tmp_path / "merged"
    report = merge(
        MergeRequest([made["archives"]["quantized"]], made["base"], out, "task_arithmetic")
    )
    loaded = hf_models.load(out)
    assert loaded["finite"] and loaded["missing"] == []
    pre = read_folder(made["base"])
    assert read_folder(out).keys() == pre.keys()
    left_out = {(r["task"], r["tensor"], r["rows"]) for r in report["left_out_rows"]}
    assert left_out == {x for x in LEFT_OUT.get(base_name, ()) if x[0] in made["tasks"]}


def test_inspect_records_what_each_task_was(store):
    report = tvq_cli.inspect_archive(
        store["llama"]["archives"]["quantized"],
        against=(store["llama"]["base"], list(store["llama"]["tasks"].values())),
    )
    tasks = {t["name"]: t for t in report["tasks"]}
    assert tasks["bf16"]["dtype"] == "BF16" and tasks["added"]["dtype"] == "F32"
    assert tasks["added"]["added_rows"] == {"model.embed_tokens.weight": 2, "lm_head.weight": 2}
    assert tasks["base-class"]["renamed"] == {"removed": "", "added": "model."}
    assert tasks["base-class"]["absent"] == ["lm_head.weight"]
    assert tasks["peft-prefix"]["renamed"] == {"removed": "base_model.model.", "added": ""}
    assert set(tasks["added"]["files"]) >= {"config.json", "tokenizer.json", "chat_template.jinja"}
    assert all(t["fingerprint"].startswith("sha256:") for t in tasks.values())
    assert all(0 < t["rel_l2"] < 0.2 for t in report["tasks"] if t["name"] != "base-class")
    if HAS_PEFT:
        assert tasks["lora"]["source"] == "lora" and tasks["lora"]["dtype"] == "F32"
    tied = tvq_cli.inspect_archive(store["llama-tied"]["archives"]["quantized"])["tasks"]
    assert [t["copies"] for t in tied] == [{}, {HEAD: EMBED}, {}]
    notes = " ".join(store["llama"]["notes"])
    assert "removed the prefix 'base_model.model.'" in notes and "mein_Modell_ü" in notes
