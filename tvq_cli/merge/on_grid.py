"""A merged tensor on an integer grid: the grid, the ambiguous values, and their rounding.

Two grids (see `archive_out`): the min-max grid of the merged task vector itself, and the
inputs' own grid for an average of FQ archives (HDRQ's setting), where the weights, not task
vectors, are rounded. `rounding.round_on_grid` puts them on it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..archive.format import Part, TensorEntry
from ..quant.groups import expand_groups
from ..quant.quantizer import quantize
from ..quant.spec import Quantized
from .base import MergeMethod
from .rounding import MergedTensor, Rounded, Rounding, ScaleGrid, round_on_grid
from .sources import Sources

Merge = Callable[[torch.Tensor], torch.Tensor]


def first_output(method: MergeMethod, name: str) -> Merge:
    """The method's merge of one tensor (a per-task method's first target model)."""

    def run(taus: torch.Tensor) -> torch.Tensor:
        merged = method.merge(name, taus)
        return merged[0] if isinstance(merged, list) else merged

    return run


def element_grid(
    scales: torch.Tensor, zeros: torch.Tensor, entry: TensorEntry, part: Part
) -> ScaleGrid:
    """A part's per-group scales and zero-points, broadcast to every element."""
    return ScaleGrid(
        expand_groups(scales, entry.shape, part.group_size),
        expand_groups(zeros.to(torch.float32), entry.shape, part.group_size),
        part.spec.levels,
    )


def min_max_codes(
    entry: TensorEntry,
    taus: torch.Tensor,
    merge: Merge,
    steps: list[torch.Tensor | None],
    rounding: Rounding,
    generator: torch.Generator,
) -> tuple[Quantized, Rounded]:
    """The merged task vector on its own min-max grid; values within the tie tolerance of a
    midpoint between two levels are ambiguous."""
    part = entry.parts[0]
    merged = merge(taus)
    grid_q = quantize(merged, part.spec)
    grid = element_grid(grid_q.scales, grid_q.zeros, entry, part)
    ambiguous = grid.ambiguous(merged, rounding.tolerance)
    tensor = MergedTensor(merged, taus, steps, merge)
    rounded = round_on_grid(tensor, grid, ambiguous, rounding, generator)
    codes = rounded.codes.to(torch.uint8).reshape(-1)
    return Quantized(codes, grid_q.scales, grid_q.zeros), rounded


def inputs_grid_codes(
    entry: TensorEntry,
    sources: Sources,
    weights: torch.Tensor,
    rounding: Rounding,
    generator: torch.Generator,
) -> tuple[Quantized, Rounded]:
    """Average of FQ inputs on their own grid: weights, not task vectors, are rounded. The
    step per group is the weighted mean of the input steps, the zero-point the rounded mean."""
    part = entry.parts[0]
    share = weights / weights.sum()
    codes, steps, inputs = [], [], []
    scales = zeros = None
    for ref, w in zip(sources.refs, share.tolist(), strict=True):
        own = ref.own_part(ref.archive.entry(entry.name))
        q = ref.archive.quantized(own, ref.archive.entry(entry.name))
        zero = expand_groups(q.zeros.to(torch.float32), entry.shape, own.group_size)
        code = q.codes.reshape(entry.shape).to(torch.float32) - zero
        step = expand_groups(1.0 / q.scales, entry.shape, own.group_size)
        codes.append(code)
        steps.append(step)
        inputs.append(code * step)
        group_step = w / q.scales
        group_zero = w * q.zeros.to(torch.float32)
        scales = group_step if scales is None else scales + group_step
        zeros = group_zero if zeros is None else zeros + group_zero
    out_scales = 1.0 / scales
    out_zeros = torch.round(zeros).clamp_(0, part.spec.levels).to(torch.uint8)
    grid = element_grid(out_scales, out_zeros, entry, part)
    stacked = torch.stack(inputs)

    def merge(values: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(share, values, dims=1)

    mean_code = torch.tensordot(share.double(), torch.stack(codes).double(), dims=1)
    ambiguous = ((mean_code - torch.floor(mean_code)) - 0.5).abs() <= 1e-9
    tensor = MergedTensor(merge(stacked), stacked, steps, merge)
    rounded = round_on_grid(tensor, grid, ambiguous, rounding, generator)
    codes_out = rounded.codes.to(torch.uint8).reshape(-1)
    return Quantized(codes_out, out_scales.to(torch.float32), out_zeros), rounded
