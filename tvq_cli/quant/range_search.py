"""Range search: per group, the clipping range with the least squared error.

Min-max ranges are set by each group's extreme values; on heavy-tailed task vectors that
wastes most levels on a few outliers. Here each group tries shrink factors of its min-max
step (1.0 included, so it is never worse than min-max), with the min-max integer zero-point
kept (so 0.0 stays exactly representable), and keeps the step whose reconstruction has the
least squared error.

Cost: the search is coarse-to-fine, every other shrink factor first, then the two neighbours
of each group's best. The torch reference below evaluates the candidates as one [groups,
candidates, group] batch in float32, in blocks small enough to stay in the CPU cache.
With compact scales (`scale_bits > 0`) the candidates are the representable coded steps
nearest to each shrink factor, so the search already accounts for the scale's rounding.

Two implementations of one arithmetic: the native kernel (`_native.c`, built with the package
where a C compiler is found) runs a group's whole search in registers; the torch ops here are
its reference and run where it is missing and on a GPU. Both sum a group's
squared error in `LANES` interleaved lanes in element order (see `_lane_sum`), so they pick
the same steps and write the same archive bytes.
"""

from __future__ import annotations

import math
import threading
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from . import native, scale_codec
from .groups import Grouping, minmax_scale
from .spec import MAX_SCALE, Quantized, QuantSpec

SHRINK_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3)
COARSE_STRIDE = 2  # first pass: every other candidate; second: the best one's neighbours
MARGIN = 1e-5  # a shrunk step must beat min-max by this relative margin (float32 sums)
BLOCK = 1 << 18  # elements x candidates per block (1 MB): the temporaries stay in cache
LANES = 8  # a group's squared error is summed in this many interleaved lanes


_local = threading.local()


def _scratch(size: int, device: torch.device) -> torch.Tensor:
    """This thread's float32 work buffer of at least `size` elements, reused across calls:
    a fresh buffer of a megabyte costs a page fault per 4 KiB (pack maps every allocation
    over 1 MiB on its own), more than the arithmetic done in it."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.numel() < size or buffer.device != device:
        buffer = _local.buffer = torch.empty(size, device=device)
    return buffer


def _lane_sum(d: torch.Tensor, acc: torch.Tensor) -> None:
    """Add `d` [..., w] (w a multiple of `LANES`) into `acc` [..., LANES]: element i goes to
    lane i % LANES, in element order. The native kernel's order, which vectorizes there."""
    for chunk in d.unflatten(-1, (-1, LANES)).unbind(-2):
        acc += chunk


def _fold(acc: torch.Tensor) -> torch.Tensor:
    """The lanes' total: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    half = acc[..., :4] + acc[..., 4:]
    quarter = half[..., :2] + half[..., 2:]
    return quarter[..., 0] + quarter[..., 1]


def _errors(
    groups: torch.Tensor,
    scales: torch.Tensor,
    zero: torch.Tensor,
    levels: int,
) -> torch.Tensor:
    """Squared error [groups, k] of quantizing each group with each of its k candidate scales,
    measured on ``(q - zero) * (1 / scale)``.

    Work goes in blocks of rows (and of columns for long groups) of about `BLOCK` elements
    times candidates, so the elementwise passes per block hit the cache.
    """
    n, width = groups.shape
    k = scales.shape[1]
    steps = torch.reciprocal(scales)
    out = torch.empty(n, k, dtype=torch.float32, device=groups.device)
    cols = min(width, max(LANES, BLOCK // k // LANES * LANES))
    rows = max(1, BLOCK // (cols * k))
    buffer = _scratch(rows * k * cols, groups.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s, step = scales[r0:r1, :, None], steps[r0:r1, :, None]
        z = zero[r0:r1, None, None]
        acc = torch.zeros(r1 - r0, k, LANES, device=groups.device)
        for c0 in range(0, width, cols):
            x = groups[r0:r1, None, c0 : c0 + cols]
            d = buffer[: (r1 - r0) * k * x.shape[2]].view(r1 - r0, k, x.shape[2])
            torch.mul(x, s, out=d).add_(z).clamp_(0, levels).round_()
            d.sub_(z).mul_(step).sub_(x).square_()
            tail = -d.shape[2] % LANES  # a last partial chunk: zeros add nothing
            _lane_sum(F.pad(d, (0, tail)) if tail else d, acc)
        out[r0:r1] = _fold(acc)
    return out


@cache
def _grid(search: bool, scale_bits: int) -> torch.Tensor:
    """Shrink factors (fp32 scales) or distinct step-code shifts (compact scales), 1.0 first."""
    factors = SHRINK_FACTORS if search else (1.0,)
    if not scale_bits:
        return torch.tensor(factors)
    per_octave = scale_codec.codes_per_octave(scale_bits)
    shifts = sorted({round(per_octave * math.log2(1.0 / c)) for c in factors})
    return torch.tensor(shifts, dtype=torch.int32)


@cache
def _steps(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse candidate indices (every `COARSE_STRIDE`-th and the last) and fine offsets."""
    coarse = sorted(set(range(0, count, COARSE_STRIDE)) | {count - 1})
    fine = [d for d in range(-(COARSE_STRIDE - 1), COARSE_STRIDE) if d]
    return torch.tensor(coarse), torch.tensor(fine)


def _candidates(
    scale_mm: torch.Tensor, spec: QuantSpec, top: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidate scales (1/step) [groups, C], largest step first, and their step codes."""
    search = spec.range == "search"
    if not spec.scale_bits:
        return scale_mm[:, None] / _grid(search, 0)[None, :], None
    steps = 1.0 / scale_mm
    base = scale_codec.covering_codes(steps, top, spec.scale_bits).to(torch.int32)
    limit = (1 << spec.scale_bits) - 1
    codes = (base[:, None] + _grid(search, spec.scale_bits)[None, :]).clamp_(0, limit)
    codes = codes.to(torch.uint8)
    return 1.0 / scale_codec.decode_steps(codes, top, spec.scale_bits), codes


def _best(
    groups: torch.Tensor,
    scales: torch.Tensor,
    zero: torch.Tensor,
    levels: int,
) -> torch.Tensor:
    """Index [groups] of each group's least-error candidate, searched coarse-to-fine.

    Candidate 0 (min-max) wins unless another beats it by `MARGIN`, so float32 sums never
    pick a worse range. Coarse: every `COARSE_STRIDE`-th candidate plus the last; fine: the
    candidates between the coarse best and its coarse neighbours.
    """
    count = scales.shape[1]
    if count == 1:
        return torch.zeros(groups.shape[0], dtype=torch.long)
    coarse, fine = _steps(count)
    err = _errors(groups, scales[:, coarse], zero, levels)
    err[:, 1:] *= 1 + MARGIN
    pick = err.argmin(dim=1)  # first of equal minima: the larger step
    best_err = err.gather(1, pick[:, None])
    best = coarse[pick]
    index = (best[:, None] + fine[None, :]).clamp_(1, count - 1)
    fine_err = _errors(groups, scales.gather(1, index), zero, levels)
    fine_err *= 1 + MARGIN
    better = fine_err.min(dim=1)
    take = better.values < best_err[:, 0]
    return torch.where(take, index.gather(1, better.indices[:, None])[:, 0], best)


def group_ranges(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's min-max range widened to include 0: (lo, hi)."""
    if native.lib is not None and groups.device.type == "cpu" and groups.is_contiguous():
        lo, hi = torch.empty(groups.shape[0]), torch.empty(groups.shape[0])
        x = groups.to(torch.float32).numpy()
        native.lib.ranges(
            x,
            native.F32,
            _NONE_F32,
            native.NONE,
            groups.shape[1],
            lo.numpy(),
            hi.numpy(),
            _NONE_F32,
        )
        return lo, hi
    return groups.amin(dim=1).clamp(max=0.0), groups.amax(dim=1).clamp(min=0.0)


def grid_top(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[float, float]:
    """The two per-tensor values of compact scales, from every group's range: the step given
    to all-zero groups (`fallback`) and the grid's top step (`top`); (1.0, 1.0) for fp32
    scales. The only part of the search that needs the whole tensor."""
    if not spec.scale_bits:
        return 1.0, 1.0
    span = hi - lo
    fallback = scale_codec.super_scale(span / spec.levels)
    return fallback, scale_codec.super_scale(1.0 / _minmax_scale(span, spec.levels, fallback))


def _minmax_scale(span: torch.Tensor, levels: int, fallback: float) -> torch.Tensor:
    # All-zero groups reconstruct exactly with any step; give them the grid's top.
    return minmax_scale(span, levels, _flat_scale(fallback))


def _flat_scale(fallback: float) -> float:
    """The scale of all-zero groups, 1 / fallback, at most MAX_SCALE (a tensor whose every
    span is subnormal has a subnormal fallback step)."""
    return min(1.0 / fallback, MAX_SCALE)


def quantize_groups(
    groups: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    spec: QuantSpec,
    fallback: float,
    top: float,
) -> Quantized:
    """Search and quantize [groups, G] given their ranges and the tensor's `grid_top`; codes
    come back in the groups' order. Every step is per group, so any block of whole groups
    gives exactly the codes, scales and step codes of the whole tensor."""
    if native.lib is not None and groups.device.type == "cpu":
        return _quantize_native(groups, lo, hi, spec, fallback, top)
    levels = spec.levels
    scale_mm = _minmax_scale(hi - lo, levels, fallback)
    zero = torch.round(-scale_mm * lo).clamp_(0, levels)
    scales, step_codes = _candidates(scale_mm, spec, top)
    best = _best(groups, scales, zero, levels)[:, None]
    scale = scales.gather(1, best)[:, 0].contiguous()
    codes = torch.round(groups * scale[:, None] + zero[:, None]).clamp_(0, levels)
    codes = codes.to(torch.uint8)
    if step_codes is None:
        return Quantized(codes, scale, zero.to(torch.uint8))
    code = step_codes.gather(1, best)[:, 0].contiguous()
    return Quantized(codes, scale, zero.to(torch.uint8), code, top)


@cache
def _native_steps(count: int) -> tuple[np.ndarray, np.ndarray]:
    coarse, fine = _steps(count)
    return coarse.to(torch.int32).numpy(), fine.to(torch.int32).numpy()


_NONE_F32 = np.empty(0, np.float32)
_NONE_I32 = np.empty(0, np.int32)
_NONE_U8 = np.empty(0, np.uint8)


def native_plan(spec: QuantSpec, fallback: float, top: float) -> tuple:
    """The native kernel's search settings for one part (its `plan` argument): levels, the
    candidates (shrink factors or step-code shifts), the step table, the coarse and fine
    steps, the margin, the all-zero groups' scale and the scale cap."""
    grid = _grid(spec.range == "search", spec.scale_bits)
    coarse, fine = _native_steps(grid.numel())
    compact = spec.scale_bits > 0
    table = scale_codec.step_table(top, spec.scale_bits).numpy() if compact else _NONE_F32
    return (
        spec.levels,
        _NONE_F32 if compact else grid.numpy(),
        grid.numpy() if compact else _NONE_I32,
        table,
        coarse,
        fine,
        1 + MARGIN,
        _flat_scale(fallback),
        MAX_SCALE,
    )


def _quantize_native(
    groups: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    spec: QuantSpec,
    fallback: float,
    top: float,
) -> Quantized:
    """`quantize_groups` through the native kernel (whole groups, host memory)."""
    n, width = groups.shape
    compact = spec.scale_bits > 0
    codes = torch.empty(n, width, dtype=torch.uint8)
    scales = torch.empty(n)
    zeros = torch.empty(n, dtype=torch.uint8)
    step_codes = torch.empty(n if compact else 0, dtype=torch.uint8)
    native.lib.encode(
        groups.to(torch.float32).contiguous().numpy(),
        native.F32,
        _NONE_F32,
        native.NONE,
        width,
        lo.contiguous().numpy(),
        hi.contiguous().numpy(),
        True,
        native_plan(spec, fallback, top),
        _NONE_F32,
        _NONE_U8,
        8,
        codes.numpy(),
        scales.numpy(),
        zeros.numpy(),
        step_codes.numpy(),
        0,
    )
    if not compact:
        return Quantized(codes, scales, zeros)
    return Quantized(codes, scales, zeros, step_codes, top)


def quantize_searched(x: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize like `quantize`, with searched ranges and/or compact scales."""
    x = x.to(torch.float32)
    if x.numel() == 0:
        step_code = torch.zeros(1, dtype=torch.uint8) if spec.scale_bits else None
        empty = torch.zeros(0, dtype=torch.uint8)
        return Quantized(empty, torch.ones(1), torch.zeros(1, dtype=torch.uint8), step_code)
    grouping = Grouping.of(tuple(x.shape), spec.group_size)
    pieces = grouping.split(x)
    ranges = [group_ranges(groups) for groups in pieces]
    lo, hi = (grouping.join([r[i] for r in ranges]) for i in (0, 1))
    fallback, top = grid_top(lo, hi, spec)
    qs = [
        quantize_groups(groups, *r, spec, fallback, top)
        for groups, r in zip(pieces, ranges, strict=True)
    ]
    steps = None if qs[0].step_codes is None else grouping.join([q.step_codes for q in qs])
    return Quantized(
        grouping.join([q.codes for q in qs]).contiguous(),
        grouping.join([q.scales for q in qs]),
        grouping.join([q.zeros for q in qs]),
        steps,
        qs[0].super_scale,
    )
