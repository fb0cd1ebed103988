"""What a quantized tensor is: its settings (`QuantSpec`) and its values (`Quantized`).

Defaults (docs/fidelity.md): groups of 128 along the last dimension, searched clipping ranges
and 6-bit compact scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import TvqError

if TYPE_CHECKING:
    import torch

RANGE_METHODS = ("minmax", "search")
DEFAULT_GROUP_SIZE = 128
DEFAULT_RANGE = "search"
DEFAULT_SCALE_BITS = 6
MAX_SCALE = 2.0**100  # finer steps buy nothing, and their inverses overflow float32
MIN_SCALE_BITS = 4  # compact scales (scale_codec): 4-8 bits per step code
MAX_SCALE_BITS = 8


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


def check_scale_bits(scale_bits: int) -> None:
    """0 means fp32 scales; otherwise 4..8 bits per step code."""
    if scale_bits != 0 and not MIN_SCALE_BITS <= scale_bits <= MAX_SCALE_BITS:
        raise TvqError(
            f"scale bits must be 0 (fp32 scales) or {MIN_SCALE_BITS}-{MAX_SCALE_BITS}, "
            f"got {scale_bits}"
        )
