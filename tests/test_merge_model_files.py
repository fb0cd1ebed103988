"""What a merged Hugging Face folder holds: the pretrained folder's companion files (an
allow-list, never other weights or pickles), and a config.json whose dtype is the weights'
own, so that transformers loads a `--dtype bf16` merge as bf16 and an fp32 one as fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FullDisk, run_cli
from safetensors.torch import load_file, save_file

from tvq_cli.io import model_writer
from tvq_cli.io.target import MANIFEST

COMPANIONS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "additional_chat_templates/tools.jinja",
    "README.md",
    "LICENSE.txt",
]
NOT_COPIED = [  # other weights, pickles, training state, code, hub plumbing
    "pytorch_model.bin",
    "model.gguf",
    "model.onnx",
    "onnx/model.onnx",
    "flax_weights.npz",
    "consolidated.pth",
    "original/params.json",
    "training_args.bin",
    "optimizer.pt",
    "trainer_state.json",
    "modeling_custom.py",
    ".gitattributes",
]


def _tiny_llama(root: Path, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    """A tiny Llama saved by transformers in `dtype`, and two fine-tunes (base + noise)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    pre = root / "pre"
    model.save_pretrained(pre)
    weights = load_file(pre / "model.safetensors")
    fts = []
    for i in range(2):
        gen = torch.Generator().manual_seed(i)
        tuned = {
            k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype)
            for k, v in weights.items()
        }
        ft = root / f"ft{i}"
        ft.mkdir()
        save_file(tuned, str(ft / "model.safetensors"), metadata={"format": "pt"})
        (ft / "config.json").write_bytes((pre / "config.json").read_bytes())
        fts.append(ft)
    return pre, fts


def _merge(root: Path, pre: Path, fts: list[Path], *extra) -> Path:
    archive = root / "a.tvq"
    if not archive.exists():
        code, _, err = run_cli("pack", *fts, "--pretrained", pre, "--out", archive)
        assert code == 0, err
    out = root / "merged"
    code, _, err = run_cli(
        "merge", archive, "--pretrained", pre, "--method", "ties", "--out", out, "--force",
        *extra,
    )  # fmt: skip
    assert code == 0, err
    return out


def _loaded_dtype(folder: Path) -> torch.dtype:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 7, 2]])).logits
    assert torch.isfinite(logits).all()
    return next(model.parameters()).dtype


@pytest.mark.parametrize(
    ("saved", "flag", "expected"),
    [
        (torch.float32, "bf16", torch.bfloat16),
        (torch.bfloat16, "fp32", torch.float32),
        (torch.bfloat16, None, torch.bfloat16),
    ],
    ids=["fp32-base-to-bf16", "bf16-base-to-fp32", "bf16-as-pretrained"],
)
def test_transformers_loads_the_merge_in_its_dtype(tmp_path, saved, flag, expected):
    pre, fts = _tiny_llama(tmp_path, saved)
    out = _merge(tmp_path, pre, fts, *(["--dtype", flag] if flag else []))
    assert _loaded_dtype(out) == expected
    config = json.loads((out / "config.json").read_text())
    name = str(expected).removeprefix("torch.")
    assert config["dtype"] == name
    if flag:  # older readers (transformers < 4.56, converters) read torch_dtype
        assert config["torch_dtype"] == name
    before = json.loads((pre / "config.json").read_text())
    assert {k: v for k, v in config.items() if "dtype" not in k} == {
        k: v for k, v in before.items() if "dtype" not in k
    }


def test_only_companion_files_are_copied(tmp_path):
    pre, fts = _tiny_llama(tmp_path, torch.float32)
    for name in COMPANIONS[2:] + NOT_COPIED:
        (pre / name).parent.mkdir(parents=True, exist_ok=True)
        (pre / name).write_text(f"{name}\n")
    out = _merge(tmp_path, pre, fts, "--dtype", "bf16")
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted([*COMPANIONS, "model.safetensors", MANIFEST])
    for name in COMPANIONS[2:]:
        assert (out / name).read_bytes() == (pre / name).read_bytes()


def test_sub_configs_that_name_a_dtype_follow(tmp_path):
    pre, fts = _tiny_llama(tmp_path, torch.float32)
    config = json.loads((pre / "config.json").read_text())
    config["text_config"] = {"torch_dtype": "float32", "hidden_size": 32}
    config["vision_config"] = {"hidden_size": 8}
    (pre / "config.json").write_text(json.dumps(config))
    out = _merge(tmp_path, pre, fts, "--dtype", "fp16")
    merged = json.loads((out / "config.json").read_text())
    text = {"torch_dtype": "float16", "hidden_size": 32, "dtype": "float16"}
    assert merged["text_config"] == text
    assert merged["vision_config"] == {"hidden_size": 8}


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_disk_full_names_the_output(tmp_path, monkeypatch, folder):
    pre, fts = _tiny_llama(tmp_path, torch.float32)
    code, _, err = run_cli("pack", *fts, "--pretrained", pre, "--out", tmp_path / "a.tvq")
    assert code == 0, err
    monkeypatch.setattr(
        model_writer,
        "SequentialFile",
        lambda *a, real=model_writer.SequentialFile, **k: FullDisk(real(*a, **k), 4000),
    )
    out = tmp_path / ("merged" if folder else "merged.safetensors")
    code, _, err = run_cli(
        "merge", tmp_path / "a.tvq", "--pretrained", pre, "--method", "average", "--out", out
    )
    assert code == 1
    assert err.strip().splitlines() == [f"tvq: error: cannot write {out}: No space left on device"]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tvq", "ft0", "ft1", "pre"]
