"""The first range search (round 1), kept only to time it against the current one.

Unchanged except imports, and the row padding of that round's grouping (now gone from
`tvq_cli.quant.groups`) copied in.
Min-max ranges are set by each group's extreme values; on heavy-tailed task vectors that
wastes most levels on a few outliers. Here each group tries a fixed grid of shrink factors of
its min-max step (1.0 included, so it is never worse than min-max), with the min-max integer
zero-point kept (so 0.0 stays exactly representable), and keeps the step whose
reconstruction has the least squared error. The grid is looped over, each candidate
vectorized over all groups: memory stays a few times the tensor, time is linear in the grid.

With compact scales (`scale_bits > 0`) the candidates are the representable coded steps
nearest to each shrink factor, so the search already accounts for the scale's rounding.
"""

from __future__ import annotations

import torch

from tvq_cli.quant import scale_codec
from tvq_cli.quant.spec import Quantized, QuantSpec

SHRINK_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3)
IMPROVEMENT = 1e-9  # relative margin so float rounding never picks a worse candidate


def _grouped(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """View `x` as (groups, group_len), each row padded to whole groups by repeating its last
    element (the grouping of that round); returns the view and the padded row length."""
    if group_size == 0:
        return x.reshape(1, -1), 0
    cols = x.shape[-1]
    rows = x.reshape(-1, cols)
    pad = (-cols) % group_size
    if pad == 0:
        return rows.reshape(-1, group_size), 0
    padded = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
    return padded.reshape(-1, group_size), cols + pad


def _ungrouped(groups: torch.Tensor, shape: tuple[int, ...], padded_cols: int) -> torch.Tensor:
    """Inverse of `_grouped`: the tensor of `shape`, padding dropped."""
    if padded_cols:
        return groups.reshape(-1, padded_cols)[:, : shape[-1]].reshape(shape)
    return groups.reshape(shape)


def _valid_mask(shape: tuple[int, ...], group_size: int, padded_cols: int) -> torch.Tensor | None:
    """1.0 on real elements, 0.0 on the padding `_grouped` adds; None when there is none."""
    if not padded_cols:
        return None
    rows = max(1, len(shape) and (torch.Size(shape).numel() // shape[-1]))
    cols = (torch.arange(padded_cols) < shape[-1]).to(torch.float32)
    return cols.expand(rows, -1).reshape(-1, group_size)


def _group_error(
    groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int, mask
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and per-group squared error (float64 sums) of quantizing with `scale`, `zero`."""
    q = torch.round(groups * scale[:, None] + zero[:, None]).clamp_(0, levels)
    diff = (q - zero[:, None]) / scale[:, None] - groups
    diff.square_()
    if mask is not None:
        diff.mul_(mask)
    return q, diff.sum(dim=1, dtype=torch.float64)


def _candidate_scales(
    scale_mm: torch.Tensor, spec: QuantSpec
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], float]:
    """Scales (1/step) to try per group, their step codes (compact scales) and the grid top."""
    factors = SHRINK_FACTORS if spec.range == "search" else (1.0,)
    if not spec.scale_bits:
        return [scale_mm / c for c in factors], [None] * len(factors), 1.0
    steps = 1.0 / scale_mm
    top = scale_codec.super_scale(steps)
    base = scale_codec.covering_codes(steps, top, spec.scale_bits).to(torch.int32)
    per_octave = scale_codec.codes_per_octave(spec.scale_bits)
    limit = (1 << spec.scale_bits) - 1
    scales, codes, seen = [], [], set()
    for c in factors:
        shift = round(per_octave * torch.log2(torch.tensor(1.0 / c)).item())
        if shift in seen:
            continue
        seen.add(shift)
        k = (base + shift).clamp_(0, limit).to(torch.uint8)
        scales.append(1.0 / scale_codec.decode_steps(k, top, spec.scale_bits))
        codes.append(k)
    return scales, codes, top


def quantize_searched(x: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize like `quantize`, with searched ranges and/or compact scales."""
    x = x.to(torch.float32)
    if x.numel() == 0:
        step_code = torch.zeros(1, dtype=torch.uint8) if spec.scale_bits else None
        empty = torch.zeros(0, dtype=torch.uint8)
        return Quantized(empty, torch.ones(1), torch.zeros(1, dtype=torch.uint8), step_code)
    levels = spec.levels
    groups, padded_cols = _grouped(x, spec.group_size)
    mask = _valid_mask(tuple(x.shape), spec.group_size, padded_cols)
    lo = groups.amin(dim=1).clamp(max=0.0)
    hi = groups.amax(dim=1).clamp(min=0.0)
    span = hi - lo
    # All-zero groups reconstruct exactly with any step; give them the grid's top.
    fallback = scale_codec.super_scale(span / levels) if spec.scale_bits else 1.0
    scale_mm = torch.where(span > 0, levels / torch.where(span > 0, span, 1.0), 1.0 / fallback)
    zero = torch.round(-scale_mm * lo).clamp_(0, levels)
    scales, step_codes, top = _candidate_scales(scale_mm, spec)
    best_q, best_err = _group_error(groups, scales[0], zero, levels, mask)
    best_scale, best_code = scales[0].clone(), step_codes[0]
    for scale, code in zip(scales[1:], step_codes[1:], strict=True):
        q, err = _group_error(groups, scale, zero, levels, mask)
        better = err < best_err * (1 - IMPROVEMENT)
        best_q = torch.where(better[:, None], q, best_q)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if code is not None:
            best_code = torch.where(better, code, best_code)
    codes = _ungrouped(best_q.to(torch.uint8), tuple(x.shape), padded_cols).reshape(-1)
    return Quantized(codes.contiguous(), best_scale, zero.to(torch.uint8), best_code, top)
