"""Scale of `tvq merge`: a sharded bf16 round trip keeps the index layout, peak memory is bounded,
and the blocked, threaded merge gives the same bytes whatever the thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import finetune
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tvq_cli
from tvq_cli.dtypes import from_torch
from tvq_cli.io.checkpoint import INDEX_FILE, TensorSpec
from tvq_cli.io.model_writer import shard_plan
from tvq_cli.merge import MergeRequest, merge
from tvq_cli.pack import PackOptions

ROOT = Path(__file__).resolve().parents[1]
PEAK_RSS = (
    "import sys\n"
    "from tvq_cli.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)\n"
    "sys.exit(code)\n"
)
FAST = PackOptions(group_size=16, range="minmax")


def save_pretrained_like(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> Path:
    """Shards as `save_pretrained` cuts them (greedy, in order) plus the index."""
    folder.mkdir(parents=True)
    specs = {n: TensorSpec(tuple(t.shape), from_torch(t.dtype)) for n, t in tensors.items()}
    shards = shard_plan(specs, max_bytes)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder


def test_sharded_bf16_round_trip_keeps_the_index_layout(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    pre = {f"l{i}.weight": (0.02 * torch.randn(64, 96, generator=gen)) for i in range(5)}
    pre = {k: v.to(torch.bfloat16) for k, v in pre.items()}
    pre["pos"] = torch.arange(8, dtype=torch.int64)
    limit = 30_000  # two 12 KiB bf16 tensors per shard
    pre_dir = save_pretrained_like(tmp_path / "pre", pre, limit)
    fts = [save_pretrained_like(tmp_path / f"ft{i}", finetune(pre, i), limit) for i in range(3)]
    archive = tmp_path / "a.tvq"
    names = {str(p): f"t{i}" for i, p in enumerate(fts)}
    tvq_cli.pack(pre_dir, fts, archive, FAST, names)
    out = tmp_path / "merged"
    merge(MergeRequest([archive], pre_dir, out, "task_arithmetic", max_shard_size=limit))
    before = json.loads((pre_dir / INDEX_FILE).read_text())
    after = json.loads((out / INDEX_FILE).read_text())
    assert after["weight_map"] == before["weight_map"]
    assert len(set(after["weight_map"].values())) == 3
    assert after["metadata"]["total_size"] == before["metadata"]["total_size"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in pre_dir.glob("*.safetensors")
    )
    for shard in set(after["weight_map"].values()):
        merged = load_file(str(out / shard))
        with safe_open(str(pre_dir / shard), "pt") as f:
            assert set(merged) == set(f.keys())
        for name, tensor in merged.items():
            assert tensor.dtype == pre[name].dtype
            if not tensor.is_floating_point():
                assert torch.equal(tensor, pre[name])
                continue
            taus = [load_file_any(ft, name).float() - pre[name].float() for ft in fts]
            truth = 0.3 * sum(taus)  # 4-bit task vectors, then rounded into bf16
            assert (tensor.float() - pre[name].float() - truth).norm() <= 0.2 * truth.norm()


def load_file_any(folder: Path, name: str) -> torch.Tensor:
    index = json.loads((folder / INDEX_FILE).read_text())
    with safe_open(str(folder / index["weight_map"][name]), "pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "average"])
def test_thread_count_and_blocks_do_not_change_the_bytes(tmp_path: Path, method: str) -> None:
    """Blocks of 64 Ki elements: a 300 x 500 tensor spans three, the last one partial."""
    gen = torch.Generator().manual_seed(5)
    pre = {"w": torch.randn(300, 500, generator=gen), "b": torch.randn(500, generator=gen)}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    fts = []
    for i in range(3):
        ft = finetune(pre, i)
        save_file(ft, str(tmp_path / f"ft{i}.safetensors"))
        fts.append(tmp_path / f"ft{i}.safetensors")
    archive = tmp_path / "a.tvq"
    tvq_cli.pack(tmp_path / "pre.safetensors", fts, archive, FAST, threads=1)
    outs = []
    for threads in (1, 2):
        out = tmp_path / f"{method}{threads}.safetensors"
        merge(MergeRequest([archive], tmp_path / "pre.safetensors", out, method, threads=threads))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    merged = load_file(str(tmp_path / f"{method}1.safetensors"))
    # the whole-tensor formula on the same task vectors gives the same values
    arch = tvq_cli.open_archive(archive)
    taus = torch.stack([arch.task_vector(t, "w") for t in arch.tasks])
    if method == "task_arithmetic":
        expected = pre["w"] + 0.3 * taus.sum(0)
        assert torch.allclose(merged["w"], expected, atol=1e-6)
    elif method == "average":
        assert torch.allclose(merged["w"], pre["w"] + taus.mean(0), atol=1e-6)


def peak_rss_of_merge(tmp_path: Path, method: str, archive: Path, pre: Path, *extra: str) -> int:
    cmd = [sys.executable, "-c", PEAK_RSS, "merge", str(archive), "--pretrained", str(pre)]
    cmd += ["--method", method, "-o", str(tmp_path / f"out-{method}{len(extra)}"), "-q", *extra]
    proc = subprocess.run(
        cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.strip().splitlines()[-1]) * 1024


def test_peak_memory_of_merge_is_bounded(tmp_path: Path) -> None:
    """4 tensors of 1024 x 2048 bf16 (16 MB per model), 4 tasks, sharded in and out."""
    tasks, largest = 4, 1024 * 2048 * 4
    gen = torch.Generator().manual_seed(11)
    pre = {
        f"l{i}.weight": (0.02 * torch.randn(1024, 2048, generator=gen)).to(torch.bfloat16)
        for i in range(4)
    }
    pre_dir = save_pretrained_like(tmp_path / "pre", pre, 10 * 2**20)
    fts = []
    for t in range(tasks):
        ft = {
            k: (v.float() + 1e-3 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
            for k, v in pre.items()
        }
        fts.append(save_pretrained_like(tmp_path / f"ft{t}", ft, 10 * 2**20))
    archive = tmp_path / "a.tvq"
    tvq_cli.pack(pre_dir, fts, archive, PackOptions(range="minmax"))
    bound = (tasks + 3) * largest + 300 * 2**20
    for method in ("task_arithmetic", "ties"):
        peak = peak_rss_of_merge(tmp_path, method, archive, pre_dir)
        assert peak <= bound, (method, peak, bound)
    # a packed output grids, rounds and packs one whole tensor at a time (unknown model type:
    # every 2-D weight is taken for a Linear)
    (pre_dir / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    peak = peak_rss_of_merge(tmp_path, "task_arithmetic", archive, pre_dir, "--quantize", "w4")
    assert peak <= (tasks + 16) * largest + 300 * 2**20, peak
