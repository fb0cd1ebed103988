"""Asymmetric uniform quantization with an integer zero-point, per tensor or per group.

The math follows the TVQ reference code: ``scale = (2^b - 1) / (max - min)``,
``zp = -round(scale * min)``, ``q = clamp(round(scale * x + zp), 0, 2^b - 1)``,
``x_hat = (q - zp) / scale``. The range is widened to include 0 so that 0.0 is always exactly
representable (task vectors are mostly near zero, and an unchanged weight must stay unchanged).

Groups: ``group_size == 0`` gives one range per tensor (the paper's setting). ``group_size == G``
gives one range per G consecutive elements along the last dimension; when the last dimension is
not a multiple of G, the last group of each row is shorter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TvqError
from .scale_codec import check_scale_bits

RANGE_METHODS = ("minmax", "search")
MAX_SCALE = 2.0**100  # finer steps buy nothing, and their inverses overflow float32


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (or one role of it) is quantized."""

    bits: int
    group_size: int
    range: str = "minmax"  # "minmax" (the paper) or "search" (least-squares clipping)
    scale_bits: int = 0  # 0: fp32 scales; 4-8: log-coded steps under a per-tensor scale

    def __post_init__(self) -> None:
        if self.range not in RANGE_METHODS:
            raise TvqError(f"range must be one of {', '.join(RANGE_METHODS)}, got {self.range!r}")
        check_scale_bits(self.scale_bits)
        if not 1 <= self.bits <= 8:
            raise TvqError(f"bits must be between 1 and 8, got {self.bits}")
        if self.group_size < 0:
            raise TvqError(f"group size must be 0 (per tensor) or positive, got {self.group_size}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1


@dataclass
class Quantized:
    """Integer codes (one uint8 per element, row-major) with per-group scale and zero-point."""

    codes: torch.Tensor  # uint8, numel elements
    scales: torch.Tensor  # float32, one per group
    zeros: torch.Tensor  # uint8, one per group
    step_codes: torch.Tensor | None = None  # uint8 per group, compact scales only
    super_scale: float = 1.0  # the compact-scale grid's top step

    def cpu(self) -> Quantized:
        """The same codes and scales in host memory (quantization may run on a GPU)."""
        steps = None if self.step_codes is None else self.step_codes.cpu()
        return Quantized(
            self.codes.cpu(), self.scales.cpu(), self.zeros.cpu(), steps, self.super_scale
        )


def group_count(shape: tuple[int, ...], group_size: int) -> int:
    """Number of quantization groups of a tensor of `shape`."""
    numel = 1
    for dim in shape:
        numel *= dim
    if group_size == 0 or numel == 0:
        return 1
    cols = shape[-1]
    return (numel // cols) * -(-cols // group_size)


def minmax_scale(span: torch.Tensor, levels: int, flat: float = 1.0) -> torch.Tensor:
    """Each group's ``levels / span``, at most `MAX_SCALE` (a subnormal span would make it
    infinite, and the archive unreadable); `flat` for groups with a zero span."""
    scale = (levels / torch.where(span > 0, span, 1.0)).clamp_(max=MAX_SCALE)
    return torch.where(span > 0, scale, flat)


def _grouped(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """View `x` as (groups, group_len); returns the view and the padded row length (0 if none).

    Rows whose length is not a multiple of the group size are padded by repeating their last
    element, which leaves every group's min and max unchanged.
    """
    if group_size == 0:
        return x.reshape(1, -1), 0
    cols = x.shape[-1]
    rows = x.reshape(-1, cols)
    pad = (-cols) % group_size
    if pad == 0:
        return rows.reshape(-1, group_size), 0
    padded = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
    return padded.reshape(-1, group_size), cols + pad


def _ungrouped(grouped: torch.Tensor, shape: tuple[int, ...], padded_cols: int) -> torch.Tensor:
    if padded_cols:
        return grouped.reshape(-1, padded_cols)[:, : shape[-1]].reshape(shape)
    return grouped.reshape(shape)


def quantize(x: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize a float tensor; returns codes in the tensor's row-major order."""
    if spec.range != "minmax" or spec.scale_bits:
        from .range_search import quantize_searched

        return quantize_searched(x, spec)
    x = x.to(torch.float32)
    if x.numel() == 0:
        empty = torch.zeros(0, dtype=torch.uint8)
        return Quantized(empty, torch.ones(1), torch.zeros(1, dtype=torch.uint8))
    groups, padded_cols = _grouped(x, spec.group_size)
    lo = groups.amin(dim=1).clamp(max=0.0)
    hi = groups.amax(dim=1).clamp(min=0.0)
    span = hi - lo
    scale = minmax_scale(span, spec.levels)
    zero = torch.round(-scale * lo).clamp_(0, spec.levels)
    q = torch.round(groups * scale[:, None] + zero[:, None]).clamp_(0, spec.levels)
    codes = _ungrouped(q.to(torch.uint8), tuple(x.shape), padded_cols).reshape(-1)
    return Quantized(codes.contiguous(), scale, zero.to(torch.uint8))


def dequantize(q: Quantized, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """Reconstruct the float32 tensor of `shape` from its codes, scales and zero-points."""
    numel = 1
    for dim in shape:
        numel *= dim
    if numel == 0:
        return torch.zeros(shape, dtype=torch.float32)
    codes = q.codes.reshape(shape).to(torch.float32)
    groups, padded_cols = _grouped(codes, spec.group_size)
    values = (groups - q.zeros.to(torch.float32)[:, None]) / q.scales[:, None]
    return _ungrouped(values, shape, padded_cols)


def expand_groups(values: torch.Tensor, shape: tuple[int, ...], group_size: int) -> torch.Tensor:
    """Broadcast one value per group (e.g. a step size) to every element of a tensor of `shape`."""
    values = values.to(torch.float32).reshape(-1)
    if group_size == 0 or len(shape) == 0:
        return values[:1].expand(shape).clone() if values.numel() else torch.zeros(shape)
    cols = shape[-1]
    per_row = -(-cols // group_size)
    rows = values.reshape(-1, per_row).repeat_interleave(group_size, dim=1)[:, :cols]
    return rows.reshape(shape).contiguous()
