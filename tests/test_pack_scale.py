"""Scale: sharded bf16 inputs, and peak memory of `tvq pack` bounded whatever the tensor count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import finetune, synthetic_model, write_checkpoint
from safetensors.torch import save_file

import tvq_cli
from tvq_cli.pack import PackOptions

ROOT = Path(__file__).resolve().parents[1]
PEAK_RSS = (
    "import sys\n"
    "from tvq_cli.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> Path:
    """Hugging Face layout: model-0000k-of-0000n.safetensors plus model.safetensors.index.json."""
    folder.mkdir(parents=True)
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[k::shards]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_sharded_bf16_input_packs_like_a_single_file(tmp_path: Path) -> None:
    pre = synthetic_model(dtype=torch.bfloat16)
    fts = [finetune(pre, i) for i in range(3)]
    single = [
        write_checkpoint(tmp_path / f"s{i}.safetensors", m) for i, m in enumerate([pre, *fts])
    ]
    sharded = [write_sharded(tmp_path / f"m{i}", m, shards=3) for i, m in enumerate([pre, *fts])]
    options = PackOptions(group_size=16)
    runs = []
    for models, out in ((single, "a.tvq"), (sharded, "b.tvq")):
        names = {str(p): f"t{i}" for i, p in enumerate(models[1:])}
        runs.append(tvq_cli.pack(models[0], models[1:], tmp_path / out, options, names))
    a, b = runs
    assert a.header.pretrained_fingerprint == b.header.pretrained_fingerprint
    one, two = tvq_cli.open_archive(a.path), tvq_cli.open_archive(b.path)
    two.verify()
    assert {t.name for t in one.header.tensors} == set(pre)
    for entry in one.header.tensors:
        if entry.kind == "shared":
            assert torch.equal(two.shared(entry.name), pre[entry.name])
            continue
        for task, ft in zip(one.tasks, fts, strict=True):
            tau = two.task_vector(task, entry.name)
            assert torch.equal(tau, one.task_vector(task, entry.name))
            truth = ft[entry.name].float() - pre[entry.name].float()
            assert (tau - truth).norm() <= 0.2 * truth.norm()


def peak_rss_of_pack(tmp_path: Path, tensors: int, tasks: int) -> tuple[int, int]:
    """Peak RSS in bytes of `tvq pack` in a child, and its memory bound (largest tensor: 8 MB
    in fp32)."""
    gen = torch.Generator().manual_seed(tensors)
    pre = {
        f"l{i}.weight": (0.02 * torch.randn(1024, 2048, generator=gen)).to(torch.bfloat16)
        for i in range(tensors)
    }
    pre_path = write_sharded(tmp_path / f"pre{tensors}", pre, shards=2)
    fts = []
    for t in range(tasks):
        ft = {
            k: (v.float() + 1e-3 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
            for k, v in pre.items()
        }
        fts.append(write_sharded(tmp_path / f"ft{tensors}-{t}", ft, shards=2))
    cmd = [
        sys.executable,
        "-c",
        PEAK_RSS,
        "pack",
        *map(str, fts),
        "--pretrained",
        str(pre_path),
        "-o",
        str(tmp_path / f"a{tensors}.tvq"),
        "-q",
    ]
    proc = subprocess.run(
        cmd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stderr.strip().splitlines()[-1]) * 1024
    largest = 1024 * 2048 * 4
    return peak, (tasks + 3) * largest + 300 * 2**20


def test_peak_memory_is_bounded_and_flat_in_the_tensor_count(tmp_path: Path) -> None:
    """4 and 8 tensors of 1024 x 2048 bf16 (16 and 32 MB per model), 2 tasks."""
    few, bound = peak_rss_of_pack(tmp_path, tensors=4, tasks=2)
    many, _ = peak_rss_of_pack(tmp_path, tensors=8, tasks=2)
    assert few <= bound and many <= bound, (few, many, bound)
    assert many - few < 32 * 2**20, (few, many)  # twice the tensors, (almost) the same peak
