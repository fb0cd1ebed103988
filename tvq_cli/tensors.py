"""Small facts about tensors that every room needs: finiteness and raw bytes."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import TvqError


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf.

    A finite sum proves it (NaN and Inf propagate through a sum) at the cost of one fast
    reduction; only when the sum overflows is the elementwise test (several times slower,
    and it allocates a mask) needed to decide.
    """
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def not_finite(where: Path | str, name: str) -> TvqError:
    """The error for a tensor holding NaN or Inf."""
    return TvqError(f"{where}: tensor {name} contains NaN or Inf")


def require_finite(tensor: torch.Tensor, where: Path | str, name: str) -> torch.Tensor:
    if not all_finite(tensor):
        raise not_finite(where, name)
    return tensor


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without copying when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())
