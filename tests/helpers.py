"""Shared test helpers: synthetic checkpoints and running the CLI in-process."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from tvq_cli.cli import main


def synthetic_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small 'pretrained' state dict with 2-D weights, 1-D params and an int64 buffer."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "embed.weight": torch.randn(50, 32, generator=gen),
        "layers.0.fc.weight": torch.randn(48, 32, generator=gen) * 0.2,
        "layers.0.fc.bias": torch.randn(48, generator=gen) * 0.1,
        "layers.1.fc.weight": torch.randn(32, 48, generator=gen) * 0.2,
        "layers.1.norm.weight": torch.ones(32),
        "head.weight": torch.randn(10, 32, generator=gen) * 0.2,
    }
    out = {k: v.to(dtype) for k, v in tensors.items()}
    out["position_ids"] = torch.arange(16, dtype=torch.int64)
    return out


def finetune(
    pretrained: dict[str, torch.Tensor], seed: int, scale: float = 0.01
) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' copy: small Laplace-like deltas on float tensors, buffers unchanged."""
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for name, tensor in pretrained.items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=gen) * torch.randn(
                tensor.shape, generator=gen
            )
            out[name] = (tensor.float() + scale * noise).to(tensor.dtype)
        else:
            out[name] = tensor.clone()
    return out


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], folder: bool = False) -> Path:
    """Save as `path` (a .safetensors file) or as a folder holding model.safetensors."""
    if folder:
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
        return path
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def make_checkpoints(
    root: Path, n_tasks: int = 3, dtype: torch.dtype = torch.float32
) -> tuple[Path, list[Path]]:
    """A pretrained file and `n_tasks` fine-tuned files under `root`."""
    pre = synthetic_model(dtype=dtype)
    pre_path = write_checkpoint(root / "pre.safetensors", pre)
    fts = [
        write_checkpoint(root / f"task{i}.safetensors", finetune(pre, i)) for i in range(n_tasks)
    ]
    return pre_path, fts


def run_cli(*args: object) -> tuple[int, str, str]:
    """Run `tvq ARGS` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, real, room: int):
        self._real, self._room = real, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= size
        return self._real.write(data)

    def __getattr__(self, name):
        return getattr(self._real, name)
