"""PEFT LoRA adapter folders as fine-tunes, without peft: adapters written by hand in peft's
on-disk form, each delta computed here by the formula peft documents, and every adapter tvq
cannot merge exactly refused by name. (tests/test_store_hf.py compares with peft itself.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tvq_cli
from tvq_cli import PackOptions, TvqError

W = "base_model.model."


def base_model() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(20, 8, generator=gen),
        "model.layers.0.q_proj.weight": torch.randn(8, 8, generator=gen),
        "model.layers.0.q_proj.bias": torch.randn(8, generator=gen),
        "model.layers.0.v_proj.weight": torch.randn(6, 8, generator=gen),
        "model.layers.0.c_fc.weight": torch.randn(8, 12, generator=gen),  # Conv1D: [in, out]
        "model.norm.weight": torch.randn(8, generator=gen),
        "lm_head.weight": torch.randn(20, 8, generator=gen),
    }


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    doc = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [], **config}
    (folder / "adapter_config.json").write_text(json.dumps(doc))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def extracted(tmp_path: Path, base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    archive = tmp_path / f"{adapter.name}.tvq"
    tvq_cli.pack(base, [adapter], archive, PackOptions(keep=("*",)))
    out = tmp_path / f"{adapter.name}.safetensors"
    tvq_cli.extract(archive, adapter.name, base, out)
    return load_file(str(out))


@pytest.fixture
def base(tmp_path) -> Path:
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(base_model(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "tiny", "vocab_size": 20}')
    return folder


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_linear_embedding_bias_patterns_rslora_saved_modules_and_tokens(tmp_path, base):
    pre = base_model()
    a_q, b_q, b_bias = randn(3, 8, seed=1), randn(8, 3, seed=2), randn(8, seed=3)
    a_v, b_v = randn(2, 8, seed=4), randn(6, 2, seed=5)
    a_e, b_e = randn(2, 20, seed=6), randn(8, 2, seed=7)
    head, rows = randn(20, 8, seed=8), randn(2, 8, seed=9)
    tensors = {
        f"{W}model.layers.0.q_proj.lora_A.weight": a_q,
        f"{W}model.layers.0.q_proj.lora_B.weight": b_q,
        f"{W}model.layers.0.q_proj.lora_B.bias": b_bias,
        f"{W}model.layers.0.v_proj.lora_A.weight": a_v,
        f"{W}model.layers.0.v_proj.lora_B.weight": b_v,
        f"{W}model.embed_tokens.lora_embedding_A": a_e,
        f"{W}model.embed_tokens.lora_embedding_B": b_e,
        f"{W}lm_head.weight": head,  # modules_to_save: the trained copy, whole
        f"{W}model.embed_tokens.token_adapter.trainable_tokens_delta": rows,
    }
    config = {
        "use_rslora": True,
        "lora_bias": True,
        "rank_pattern": {"q_proj": 3},
        "alpha_pattern": {"model.layers.0.v_proj": 5},
        "modules_to_save": ["lm_head"],
        "trainable_token_indices": {"embed_tokens": [4, 7]},
    }
    adapter = write_adapter(tmp_path / "adapter", config, tensors)
    got = extracted(tmp_path, base, adapter)
    q_scale, v_scale, e_scale = 4 / math.sqrt(3), 5 / math.sqrt(2), 4 / math.sqrt(2)
    embed = pre["model.embed_tokens.weight"] + (b_e @ a_e).T * e_scale
    embed[[4, 7]] = rows  # trainable tokens are the rows' new values
    expected = {
        **pre,
        "model.layers.0.q_proj.weight": pre["model.layers.0.q_proj.weight"] + b_q @ a_q * q_scale,
        "model.layers.0.q_proj.bias": pre["model.layers.0.q_proj.bias"] + b_bias * q_scale,
        "model.layers.0.v_proj.weight": pre["model.layers.0.v_proj.weight"] + b_v @ a_v * v_scale,
        "model.embed_tokens.weight": embed,
        "lm_head.weight": head,
    }
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0)
    assert torch.equal(got["model.norm.weight"], pre["model.norm.weight"])  # untouched: exact


def test_fan_in_fan_out_and_dora(tmp_path, base):
    pre = base_model()
    a, b = randn(2, 8, seed=1), randn(12, 2, seed=2)
    conv = write_adapter(
        tmp_path / "conv",
        {"fan_in_fan_out": True},
        {f"{W}model.layers.0.c_fc.lora_A.weight": a, f"{W}model.layers.0.c_fc.lora_B.weight": b},
    )
    got = extracted(tmp_path, base, conv)
    expected = pre["model.layers.0.c_fc.weight"] + (b @ a * 2).T
    torch.testing.assert_close(got["model.layers.0.c_fc.weight"], expected, atol=1e-6, rtol=0)
    magnitude = randn(8, seed=3).abs() + 1
    aq, bq = randn(2, 8, seed=4), randn(8, 2, seed=5)
    dora = write_adapter(
        tmp_path / "dora",
        {"use_dora": True},
        {
            f"{W}model.layers.0.q_proj.lora_A.weight": aq,
            f"{W}model.layers.0.q_proj.lora_B.weight": bq,
            f"{W}model.layers.0.q_proj.lora_magnitude_vector": magnitude,
        },
    )
    got = extracted(tmp_path, base, dora)
    updated = pre["model.layers.0.q_proj.weight"] + bq @ aq * 2
    expected = updated * (magnitude / updated.norm(dim=1)).unsqueeze(1)
    torch.testing.assert_close(got["model.layers.0.q_proj.weight"], expected, atol=1e-6, rtol=0)


LORA_A = {f"{W}model.layers.0.q_proj.lora_A.weight": randn(2, 8)}
PAIR = {**LORA_A, f"{W}model.layers.0.q_proj.lora_B.weight": randn(8, 2)}


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"peft_type": "LOHA"}, PAIR, "it is a LOHA adapter; tvq reads LoRA adapters"),
        ({"target_parameters": ["w"]}, PAIR, "targets raw parameters"),
        ({"layer_replication": [[0, 1]]}, PAIR, "replicates layers"),
        ({"init_lora_weights": "pissa_niter_4"}, PAIR, "changes the base weights"),
        ({"r": 3}, PAIR, "has rank 2 in its weights but 3 in adapter_config.json"),
        ({}, LORA_A, "has no lora_A/lora_B pair"),
        (
            {},
            {f"{W}model.layers.0.k_proj.lora_A.weight": randn(2, 8)}
            | {f"{W}model.layers.0.k_proj.lora_B.weight": randn(8, 2)},
            "changes 1 tensors the pretrained checkpoint does not have",
        ),
        (
            {},
            {f"{W}model.layers.0.q_proj.lora_A.weight": randn(2, 8, 1, 1)}
            | {f"{W}model.layers.0.q_proj.lora_B.weight": randn(8, 2, 1, 1)},
            "LoRA on a convolution",
        ),
        (
            {},
            {k.replace(".weight", ".a.weight"): v for k, v in PAIR.items()}
            | {k.replace(".weight", ".b.weight"): v.clone() for k, v in PAIR.items()},
            "holds several adapters (a, b)",
        ),
    ],
)
def test_adapters_that_cannot_be_merged_exactly_are_refused(
    tmp_path, base, config, tensors, message
):
    adapter = write_adapter(tmp_path / "adapter", config, tensors)
    with pytest.raises(TvqError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tvq_cli.pack(base, [adapter], tmp_path / "a.tvq")
    assert not (tmp_path / "a.tvq").exists()


def test_adapter_folders_users_get_wrong(tmp_path, base):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    (pickled / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(TvqError, match="adapter_model.bin is a pickle"):
        tvq_cli.pack(base, [pickled], tmp_path / "a.tvq")
    named = tmp_path / "named"
    named.mkdir()
    write_adapter(named / "math", {}, PAIR)
    write_adapter(named / "code", {}, PAIR)
    with pytest.raises(TvqError, match="holds the PEFT adapters code, math in subfolders"):
        tvq_cli.pack(base, [named], tmp_path / "a.tvq")
    result = tvq_cli.pack(base, [named / "math"], tmp_path / "a.tvq")
    assert result.header.info("math").source == "lora"
    assert "PEFT LoRA adapter (1 modules, r=2)" in result.notes[0]
