"""The fp32 task-arithmetic merge of the zoo: the reference quantized merges are compared to."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .layout import Zoo
from .store import load_state


def task_arithmetic(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: list[Mapping[str, torch.Tensor]],
    lam: float = 0.3,
) -> dict[str, torch.Tensor]:
    """``theta_pre + lam * sum_t (theta_t - theta_pre)``, in float32, tasks summed in order."""
    merged: dict[str, torch.Tensor] = {}
    for name, base in pretrained.items():
        base32 = base.to(torch.float32)
        total = torch.zeros_like(base32)
        for state in finetuned:
            total += state[name].to(torch.float32) - base32
        merged[name] = base32 + lam * total
    return merged


def task_arithmetic_fp32(zoo: Zoo, lam: float = 0.3) -> dict[str, torch.Tensor]:
    """The zoo's full-precision task-arithmetic merge over all its tasks (backbone only)."""
    return task_arithmetic(
        load_state(zoo.pretrained), [load_state(p) for p in zoo.tasks.values()], lam
    )
