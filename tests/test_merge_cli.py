"""`tvq merge` end to end: files and Hugging Face folders in and out, reports, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import finetune, make_checkpoints, run_cli, synthetic_model, write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from tvq_cli.io.target import MANIFEST


def _pack(root: Path, pre: Path, fts: list[Path], name: str = "a.tvq", *extra) -> Path:
    out = root / name
    code, _, err = run_cli("pack", *fts, "--pretrained", pre, "--out", out, *extra)
    assert code == 0, err
    return out


@pytest.fixture
def packed(tmp_path):
    pre, fts = make_checkpoints(tmp_path, 3)
    return tmp_path, pre, fts, _pack(tmp_path, pre, fts, "a.tvq", "--bits", 8)


def test_file_in_file_out_matches_task_arithmetic(packed):
    root, pre, fts, archive = packed
    out = root / "merged.safetensors"
    code, stdout, err = run_cli(
        "merge", archive, "--pretrained", pre, "--method", "task_arithmetic", "--out", out
    )
    assert code == 0, err
    assert "task_arithmetic" in stdout and "lambda=0.3" in stdout
    merged, base = load_file(out), load_file(pre)
    tuned = [load_file(f) for f in fts]
    assert set(merged) == set(base)
    for name, tensor in base.items():
        assert merged[name].shape == tensor.shape and merged[name].dtype == tensor.dtype
        if not tensor.is_floating_point():
            assert torch.equal(merged[name], tensor)
            continue
        expected = tensor + 0.3 * sum(t[name] - tensor for t in tuned)
        step = max(float((t[name] - tensor).abs().max()) for t in tuned) / 127
        assert torch.allclose(merged[name], expected, atol=3 * 0.3 * step + 1e-6)


def test_json_report_and_dtype_and_task_selection(packed):
    root, pre, _, archive = packed
    out = root / "m.safetensors"
    code, stdout, err = run_cli(
        "merge", archive, "--pretrained", pre, "--method", "ties", "--tasks", "task2,task0",
        "--weights", "1,2", "--dtype", "bf16", "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["method"] == "ties" and report["tasks"] == ["task2", "task0"]
    assert report["coefficients"] == {"lambda": 0.3, "topk": 20.0, "topk_scope": "global"}
    assert report["weights"] == [1.0, 2.0]
    assert report["output"]["bytes"] == out.stat().st_size
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("embed.weight").dtype == torch.bfloat16
        assert f.get_tensor("position_ids").dtype == torch.int64


def test_archives_merge_together_when_they_share_the_pretrained(tmp_path):
    pre, fts = make_checkpoints(tmp_path, 3)
    a = _pack(tmp_path, pre, fts[:2], "a.tvq")
    b = _pack(tmp_path, pre, fts[2:], "b.tvq", "--scheme", "fq", "--bits", 8)
    out = tmp_path / "m.safetensors"
    code, stdout, err = run_cli(
        "merge", a, b, "--pretrained", pre, "--method", "average", "--out", out, "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["tasks"] == ["task0", "task1", "task2"]


def test_per_task_methods_write_one_model_per_task(packed):
    root, pre, _, archive = packed
    out = root / "tall"
    code, _, err = run_cli(
        "merge", archive, "--pretrained", pre, "--method", "tall", "--all-tasks", "--out", out
    )
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == [MANIFEST, *(f"task{i}.safetensors" for i in range(3))]
    single = root / "emr1.safetensors"
    code, _, err = run_cli(
        "merge", archive, "--pretrained", pre, "--method", "emr", "--task", "task1", "--out", single
    )
    assert code == 0, err
    assert set(load_file(single)) == set(load_file(pre))


def _hf_folder(root: Path) -> tuple[Path, list[Path]]:
    pre = synthetic_model()
    pre_dir = write_checkpoint(root / "pre", pre, folder=True)
    (pre_dir / "tokenizer.json").write_text('{"model": "tiny"}')
    (pre_dir / "pytorch_model.bin").write_bytes(b"stale weights must not be copied")
    fts = [write_checkpoint(root / f"ft{i}", finetune(pre, i), folder=True) for i in range(2)]
    return pre_dir, fts


def test_hf_folder_in_sharded_folder_out(tmp_path):
    pre, fts = _hf_folder(tmp_path)
    archive = _pack(tmp_path, pre, fts)
    out = tmp_path / "merged"
    code, _, err = run_cli(
        "merge", archive, "--pretrained", pre, "--method", "average", "--out", out,
        "--max-shard-size", "8KB",
    )  # fmt: skip
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "tokenizer.json" in names
    assert "pytorch_model.bin" not in names and "model.safetensors" not in names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(n for n in names if n.startswith("model-"))
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                assert index["weight_map"][key] == shard
                total += f.get_tensor(key).numel() * 4 if key != "position_ids" else 16 * 8
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(load_file(pre / "model.safetensors"))


def test_transformers_loads_the_merged_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    model.save_pretrained(tmp_path / "pre", safe_serialization=True)
    fts = []
    for i in range(2):
        with torch.no_grad():
            tuned = transformers.BertModel(config)
            tuned.load_state_dict(model.state_dict())
            for p in tuned.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        tuned.save_pretrained(tmp_path / f"ft{i}", safe_serialization=True)
        fts.append(tmp_path / f"ft{i}")
    archive = _pack(tmp_path, tmp_path / "pre", fts)
    out = tmp_path / "merged"
    code, _, err = run_cli(
        "merge", archive, "--pretrained", tmp_path / "pre", "--method", "ties", "--out", out,
        "--max-shard-size", "20KB",
    )  # fmt: skip
    assert code == 0, err
    assert (out / "model.safetensors.index.json").is_file()
    merged = transformers.AutoModel.from_pretrained(out)
    ids = torch.tensor([[1, 5, 7, 2]])
    assert merged(ids).last_hidden_state.shape == (1, 4, 16)


def test_quantized_output_round_trips_to_a_model(packed):
    root, pre, _, archive = packed
    tvq = root / "m.tvq"
    code, _, err = run_cli(
        "merge", archive, "--pretrained", pre, "--method", "task_arithmetic", "--out", tvq,
        "--bits", 8,
    )  # fmt: skip
    assert code == 0, err
    direct, back = root / "direct.safetensors", root / "back.safetensors"
    run_cli("merge", archive, "--pretrained", pre, "--method", "task_arithmetic", "--out", direct)
    code, _, err = run_cli("merge", tvq, "--pretrained", pre, "--method", "average", "--out", back)
    assert code == 0, err
    a, b = load_file(direct), load_file(back)
    for name in a:
        if a[name].is_floating_point():
            span = float((a[name] - load_file(pre)[name]).abs().max()) * 2
            assert torch.allclose(a[name], b[name], atol=span / 255 + 1e-6)


def _fails(tmp_path: Path, out: Path, *args, code: int = 1) -> str:
    """The merge fails with exit `code` (2: a usage error), one line, nothing written."""
    before = sorted(p.name for p in tmp_path.iterdir())
    exit_code, stdout, err = run_cli("merge", *args)
    assert exit_code == code and stdout == ""
    assert err.startswith("tvq: error: ") and err.count("\n") == 1, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp files left
    return err


def test_errors_are_one_line_and_write_nothing(packed):
    root, pre, fts, archive = packed
    out = root / "x.safetensors"
    base = (archive, "--pretrained", pre, "--out", out)
    other = write_checkpoint(root / "other.safetensors", synthetic_model(seed=5))
    assert "different pretrained" in _fails(
        root, out, archive, "--pretrained", other, "--method", "average", "--out", out
    )
    small = write_checkpoint(root / "small.safetensors", {"w": torch.zeros(2, 2)})
    assert "not in" in _fails(
        root, out, archive, "--pretrained", small, "--method", "average", "--out", out
    )
    usage = {
        "unknown merge method": ("--method", "soup"),
        "--lambda must be finite": ("--method", "ties", "--lambda", "nan"),
        "does not take --gamma": ("--method", "ties", "--gamma", 0.1),
        "--weights has 2 values": ("--method", "task_arithmetic", "--weights", "1,2"),
        "does not take --weights": ("--method", "magmax", "--weights", "1,2,3"),
        "no task named": ("--method", "average", "--tasks", "zz"),
        "--task NAME or --all-tasks": ("--method", "tall"),
        "only to a quantized output": ("--method", "average", "--bits", 4),
        "--method is required": (),
        "--dtype must be": ("--method", "average", "--dtype", "int8"),
        "invalid size": ("--method", "average", "--max-shard-size", "lots"),
    }
    for message, args in usage.items():
        assert message in _fails(root, out, *base, *args, code=2)
    before = pre.read_bytes()
    code, _, err = run_cli("merge", *base[:3], "--out", pre, "--method", "average", "--force")
    assert code == 1 and "refusing to overwrite an input" in err and pre.read_bytes() == before


def test_mismatched_archives_are_refused_unless_allowed(tmp_path):
    """--force only replaces the output; a different base takes --allow-different-base."""
    pre, fts = make_checkpoints(tmp_path, 2)
    a = _pack(tmp_path, pre, fts[:1], "a.tvq")
    other_pre = write_checkpoint(tmp_path / "pre2.safetensors", synthetic_model(seed=3))
    b = _pack(tmp_path, other_pre, fts[1:], "b.tvq")
    out = tmp_path / "m.safetensors"
    err = _fails(tmp_path, out, a, b, "--pretrained", pre, "--method", "average", "--out", out)
    assert "b.tvq" in err and "--allow-different-base" in err
    code, _, err = run_cli(
        "merge", a, b, "--pretrained", pre, "--method", "average", "--out", out, "--force",
    )  # fmt: skip
    assert code == 1 and "--allow-different-base" in err and not out.exists()
    code, stdout, err = run_cli(
        "merge", a, b, "--pretrained", pre, "--method", "average", "--out", out,
        "--allow-different-base", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["fingerprint_mismatch"] == [str(b)]


def test_existing_output_needs_force(packed):
    root, pre, _, archive = packed
    out = root / "m.safetensors"
    out.write_bytes(b"keep me")
    args = ("merge", archive, "--pretrained", pre, "--method", "average", "--out", out)
    code, _, err = run_cli(*args)
    assert code == 1 and "--force" in err and out.read_bytes() == b"keep me"
    code, _, err = run_cli(*args, "--force")
    assert code == 0, err and load_file(out)


def test_list_methods(tmp_path):
    code, stdout, _ = run_cli("merge", "--list-methods", "--json")
    assert code == 0
    methods = {m["name"]: m for m in json.loads(stdout)}
    assert set(methods) == {
        "task_arithmetic", "average", "ties", "dare", "breadcrumbs", "magmax", "tall",
        "consensus", "lines", "emr",
    }  # fmt: skip
    assert {o["flag"]: o["default"] for o in methods["ties"]["options"]}["--topk"] == 20.0


def test_a_group_size_longer_than_every_row_is_one_group_per_row(tmp_path):
    """--group-size 1000000 packs and merges like groups of a whole row (here 48 >= every row
    of the model), at the same speed: rows are never padded to the group size."""
    pre, fts = make_checkpoints(tmp_path, 2)
    merged = []
    for group in (48, 1_000_000):
        archive = _pack(tmp_path, pre, fts, f"g{group}.tvq", "--group-size", group)
        out = tmp_path / f"g{group}.safetensors"
        code, _, err = run_cli(
            "merge", archive, "--pretrained", pre, "--method", "ties", "--out", out
        )
        assert code == 0, err
        merged.append(out.read_bytes())
    assert merged[0] == merged[1]
