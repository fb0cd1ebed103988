"""Compact scales: per-group quantization steps as small log-domain codes under one fp32 scale.

Like GGUF k-quants (6-bit scales under an fp16 super-scale), a group's step costs a few bits
instead of 32, so small groups stay cheap. The step is coded on a logarithmic grid because
task-vector groups span orders of magnitude: with `scale_bits = s` the grid has 2^(s-4) codes
per octave and reaches (2^s - 1) / 2^(s-4) octaves (just under 16) below the tensor's largest
step `D`: ``step(k) = D * 2^(-k / 2^(s-4))``, k in [0, 2^s - 1]. A coded step is within
2^(1 / 2^(s-3)) - 1 of the wanted one (2.2% at 8 bits, 9% at 6 bits); steps below the grid
are clamped to its smallest step (coarser, never clipping).
"""

from __future__ import annotations

from functools import lru_cache

import torch


def codes_per_octave(scale_bits: int) -> int:
    return 1 << (scale_bits - 4)


def max_relative_error(scale_bits: int) -> float:
    """Worst relative error of a coded step that lies inside the grid (half a grid step)."""
    return 2.0 ** (0.5 / codes_per_octave(scale_bits)) - 1.0


def super_scale(steps: torch.Tensor) -> float:
    """The tensor's largest step (the grid's top); 1.0 when every step is zero."""
    top = float(steps.max()) if steps.numel() else 0.0
    return top if top > 0 and torch.isfinite(torch.tensor(top)) else 1.0


def encode_steps(steps: torch.Tensor, top: float, scale_bits: int) -> torch.Tensor:
    """Nearest grid code (uint8) of each step; steps at or above `top` map to code 0."""
    per_octave = codes_per_octave(scale_bits)
    ratio = (top / steps.clamp(min=torch.finfo(torch.float32).tiny)).clamp(min=1.0)
    k = torch.round(torch.log2(ratio.double()) * per_octave)
    return k.clamp_(0, (1 << scale_bits) - 1).to(torch.uint8)


@lru_cache(maxsize=64)
def step_table(top: float, scale_bits: int) -> torch.Tensor:
    """Every code's float32 step, code 0 (the grid's top) first: one decreasing table that
    decoding, the covering code and the native search all read, so they agree to the bit.
    Cached (every block of a part asks for the same table); callers must not modify it."""
    exps = -torch.arange(1 << scale_bits, dtype=torch.float64) / codes_per_octave(scale_bits)
    return (top * torch.pow(2.0, exps)).to(torch.float32)


def covering_codes(steps: torch.Tensor, top: float, scale_bits: int) -> torch.Tensor:
    """The largest code whose step is still >= `steps` (so the min-max range stays covered);
    code 0 where even the top step is smaller."""
    ascending = step_table(top, scale_bits).flip(0).to(steps.device)
    covered = ascending.numel() - torch.searchsorted(ascending, steps.contiguous())
    return (covered - 1).clamp_(min=0).to(torch.uint8)


def decode_steps(codes: torch.Tensor, top: float, scale_bits: int) -> torch.Tensor:
    """Float32 steps of the codes."""
    return step_table(top, scale_bits).to(codes.device)[codes.long()]
