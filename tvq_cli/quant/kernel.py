"""Allocation-free group-wise quantization of a block of rows: the pack pipeline's hot loop.

Same math, op for op, as `quantizer.quantize` / `dequantize` (tests/test_kernel.py checks the
codes, scales and zero-points are bit-identical), but written into caller-owned buffers with
in-place ops. Why: on the target machine a fresh multi-megabyte tensor costs a page fault per
4 KiB, which made allocation, not arithmetic, the main cost of `quantize` on big tensors; a
block of a few hundred thousand elements in reused buffers stays in cache and allocates
nothing. Only whole groups are handled (group size > 0 dividing the last dimension); the
pipeline uses `quantize` itself for every other case.
"""

from __future__ import annotations

import numpy as np
import torch

from .quantizer import QuantSpec, minmax_scale


def covers(spec: QuantSpec, cols: int) -> bool:
    """Whether this kernel reproduces `quantize(x, spec)` for rows of `cols` elements."""
    return (
        spec.group_size > 0
        and cols % spec.group_size == 0
        and spec.range == "minmax"
        and spec.scale_bits == 0
    )


def quantize_into(
    x: torch.Tensor,
    spec: QuantSpec,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    work: torch.Tensor,
) -> None:
    """Quantize contiguous float32 `x` (whole groups): codes (uint8, x.numel()), scales
    (float32) and zero-points (uint8, one per group); `work` is float32 of x.numel()."""
    groups = x.view(-1, spec.group_size)
    lo = groups.amin(dim=1).clamp_(max=0.0)  # two reductions: torch's fused aminmax over
    hi = groups.amax(dim=1).clamp_(min=0.0)  # short rows is 10x slower than both together
    span = hi - lo
    scale = minmax_scale(span, spec.levels)
    zero = torch.round(-scale * lo).clamp_(0, spec.levels)
    q = work.view(-1, spec.group_size)
    torch.mul(groups, scale[:, None], out=q)
    q.add_(zero[:, None]).round_().clamp_(0, spec.levels)
    # numpy's float->uint8 cast is vectorized, torch's is not (10x slower); values are exact
    np.copyto(codes.numpy(), work.numpy(), casting="unsafe")
    scales.copy_(scale)
    zeros.copy_(zero)


def dequantize_into(
    codes: torch.Tensor,
    spec: QuantSpec,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """`dequantize` of whole groups into float32 `out` (same element count as `codes`)."""
    out.copy_(codes)
    values = out.view(-1, spec.group_size)
    values.sub_(zeros.to(torch.float32)[:, None]).div_(scales[:, None])
