"""Asymmetric uniform quantization with an integer zero-point, per tensor or per group.

The math follows the TVQ reference code: ``scale = (2^b - 1) / (max - min)``,
``zp = -round(scale * min)``, ``q = clamp(round(scale * x + zp), 0, 2^b - 1)``,
``x_hat = (q - zp) / scale``. The range is widened to include 0 so that 0.0 is always exactly
representable (task vectors are mostly near zero, and an unchanged weight must stay unchanged).
Searched ranges and compact scales take `range_search` instead of the plain min-max here.
"""

from __future__ import annotations

import torch

from .groups import Grouping, minmax_scale
from .range_search import quantize_searched
from .spec import Quantized, QuantSpec


def quantize(x: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize a float tensor; returns codes in the tensor's row-major order."""
    if spec.range != "minmax" or spec.scale_bits:
        return quantize_searched(x, spec)
    x = x.to(torch.float32)
    if x.numel() == 0:
        empty = torch.zeros(0, dtype=torch.uint8)
        return Quantized(empty, torch.ones(1), torch.zeros(1, dtype=torch.uint8))
    grouping = Grouping.of(tuple(x.shape), spec.group_size)
    codes, scales, zeros = [], [], []
    for groups in grouping.split(x):
        lo = groups.amin(dim=1).clamp(max=0.0)
        hi = groups.amax(dim=1).clamp(min=0.0)
        scale = minmax_scale(hi - lo, spec.levels)
        zero = torch.round(-scale * lo).clamp_(0, spec.levels)
        q = torch.round(groups * scale[:, None] + zero[:, None]).clamp_(0, spec.levels)
        codes.append(q.to(torch.uint8))
        scales.append(scale)
        zeros.append(zero.to(torch.uint8))
    return Quantized(grouping.join(codes).contiguous(), grouping.join(scales), grouping.join(zeros))


def dequantize(q: Quantized, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """Reconstruct the float32 tensor of `shape` from its codes, scales and zero-points."""
    numel = 1
    for dim in shape:
        numel *= dim
    if numel == 0:
        return torch.zeros(shape, dtype=torch.float32)
    grouping = Grouping.of(shape, spec.group_size)
    codes = grouping.split(q.codes.reshape(-1).to(torch.float32))
    scales, zeros = grouping.split_groups(q.scales), grouping.split_groups(q.zeros)
    values = [
        (c - z.to(torch.float32)[:, None]) / s[:, None]
        for c, s, z in zip(codes, scales, zeros, strict=True)
    ]
    return grouping.join(values).reshape(shape)
