"""`--device` and `--threads`: clear one-line errors, CPU stays the default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_checkpoints, run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: cuda is usable")
def test_cuda_without_gpu_is_one_clear_line(tmp_path: Path) -> None:
    pre, fts = make_checkpoints(tmp_path, n_tasks=2)
    out = tmp_path / "a.tvq"
    code, _, err = run_cli("pack", *fts, "--pretrained", pre, "-o", out, "--device", "cuda")
    assert code == 1
    assert err.strip().splitlines() == [
        "tvq: error: --device cuda: no CUDA GPU is available here; use --device cpu"
    ]
    assert not out.exists() and list(tmp_path.glob(".a.tvq*")) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_gives_the_same_archive_as_cpu(tmp_path: Path) -> None:
    pre, fts = make_checkpoints(tmp_path, n_tasks=2)
    for device in ("cpu", "cuda"):
        code, _, err = run_cli(
            "pack", *fts, "--pretrained", pre, "-o", tmp_path / f"{device}.tvq", "--device", device
        )
        assert code == 0, err
    assert (tmp_path / "cpu.tvq").read_bytes() == (tmp_path / "cuda.tvq").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--device", "tpu"), "--device must be cpu or cuda, got 'tpu'"),
        (("--threads", "0"), "--threads must be at least 1, got 0"),
    ],
)
def test_bad_execution_options(tmp_path: Path, args, message) -> None:
    pre, fts = make_checkpoints(tmp_path, n_tasks=1)
    code, _, err = run_cli("pack", *fts, "--pretrained", pre, "-o", tmp_path / "a.tvq", *args)
    assert code == 2 and err.strip() == f"tvq: error: {message}"  # usage errors


def test_one_thread_works(tmp_path: Path) -> None:
    pre, fts = make_checkpoints(tmp_path, n_tasks=2)
    code, out, err = run_cli(
        "pack", *fts, "--pretrained", pre, "-o", tmp_path / "a.tvq", "--threads", "1"
    )
    assert code == 0, err
    assert "wrote" in out
