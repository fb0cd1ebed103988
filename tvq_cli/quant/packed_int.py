"""compressed-tensors' integer weight format (`pack-quantized`): its grid and its int32 packing.

A weight `[out, in]` is stored as signed codes `q` in `[-2^(b-1), 2^(b-1) - 1]` with one step
(the package calls it `scale`) per group of G input columns, or per row ("channel"), and, for an
asymmetric grid, a signed zero-point: `w = (q - zp) * step`. The grid is computed exactly as
compressed-tensors 0.20's `calculate_qparams` does, so nearest rounding gives the same bytes as
the package (docs/merge.md). Packing stores each value unsigned (`q + 2^(b-1)`), densely and
little-endian along a row: element i holds bits [i*b, (i+1)*b) of the row's bit stream, word k
bits [32k, 32k + 32). That is tvq's own dense bit order (`bitpack`) read as int32 words, so a
row padded to a multiple of 32 values packs with `pack_bits` and starts on a word boundary.
Codes are packed along the input dimension, zero-points along the output dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import TvqError
from .bitpack import pack_bits, unpack_bits

WORD_BITS = 32


@dataclass(frozen=True)
class PackedScheme:
    """Bits, grouping and symmetry of a quantized Linear weight."""

    bits: int
    group_size: int  # 0: one step per output row ("channel" strategy)
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise TvqError(f"packed weights take 2 to 8 bits, got {self.bits}")
        if self.group_size < 0:
            raise TvqError(f"group size must be 0 (per channel) or positive, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def strategy(self) -> str:
        return "group" if self.group_size else "channel"

    def fits(self, shape: tuple[int, ...]) -> bool:
        """compressed-tensors needs a 2-D weight whose rows split into whole groups."""
        return len(shape) == 2 and (self.group_size == 0 or shape[1] % self.group_size == 0)

    def groups(self, in_features: int) -> int:
        return in_features // self.group_size if self.group_size else 1

    def packed_words(self, count: int) -> int:
        return math.ceil(count * self.bits / WORD_BITS)


def grouped(weight: torch.Tensor, scheme: PackedScheme) -> torch.Tensor:
    """`[out, groups, G]` view of a 2-D weight (channel: one group per row)."""
    out, cols = weight.shape
    size = scheme.group_size or cols
    return weight.reshape(out, cols // size, size)


def weight_grid(
    weight: torch.Tensor, scheme: PackedScheme, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: the step in `dtype` (as stored) and the signed zero-point (0 if symmetric).

    The range always includes 0. Symmetric: `step = max(|lo|, |hi|) / ((2^b - 1) / 2)` (amax/7.5
    at 4 bits, so -8 is reached only at -amax). Asymmetric: `step = (hi - lo) / (2^b - 1)`,
    `zp = round(clamp(qmin - lo / step))`. A zero step becomes the dtype's epsilon."""
    groups = grouped(weight, scheme)
    lo = groups.amin(-1).clamp(max=0.0)
    hi = groups.amax(-1).clamp(min=0.0)
    bit_range = torch.tensor(float(scheme.qmax - scheme.qmin))
    if scheme.symmetric:
        step = torch.maximum(lo.abs(), hi.abs()) / (bit_range / 2)
        zero = torch.zeros_like(step)
    else:
        step = (hi - lo) / bit_range
        safe = torch.where(step == 0, torch.ones_like(step), step)
        zero = torch.where(step == 0, float(scheme.qmin), scheme.qmin - lo / safe)
        zero = torch.round(zero.clamp(scheme.qmin, scheme.qmax))
    step = step.to(dtype)
    step = torch.where(step == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), step)
    return step, zero


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned b-bit codes `[rows, n]` (uint8) as int32 words `[rows, ceil(n*b/32)]`, packed
    along each row."""
    rows, count = codes.shape
    padded = -(-count // WORD_BITS) * WORD_BITS
    block = np.zeros((rows, padded), dtype=np.uint8)
    block[:, :count] = codes.numpy()
    stream = pack_bits(block, bits)  # each padded row fills exactly `bits * padded/32` words
    words = stream.view(np.dtype("<i4")).reshape(rows, -1)
    width = math.ceil(count * bits / WORD_BITS)
    return torch.from_numpy(np.ascontiguousarray(words[:, :width]).astype(np.int32))


def unpack_int32(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_int32`: `[rows, count]` unsigned codes (uint8)."""
    rows, width = words.shape
    if width != math.ceil(count * bits / WORD_BITS):
        raise TvqError(f"{width} packed words per row do not hold {count} codes of {bits} bits")
    padded = -(-count // WORD_BITS) * WORD_BITS
    full = np.zeros((rows, padded * bits // WORD_BITS), dtype="<i4")
    full[:, :width] = words.numpy()
    codes = unpack_bits(full.view(np.uint8).reshape(-1), bits, rows * padded)
    return torch.from_numpy(codes.reshape(rows, padded)[:, :count].copy())


def pack_codes(codes: torch.Tensor, scheme: PackedScheme) -> torch.Tensor:
    """Signed codes `[out, in]` as the stored `weight_packed` (along the input dimension)."""
    return pack_int32((codes.to(torch.int16) - scheme.qmin).to(torch.uint8), scheme.bits)


def pack_zero_points(zero: torch.Tensor, scheme: PackedScheme) -> torch.Tensor:
    """Signed zero-points `[out, groups]` as the stored `weight_zero_point` (packed along the
    output dimension)."""
    unsigned = (zero.to(torch.int16) - scheme.qmin).to(torch.uint8)
    return pack_int32(unsigned.t().contiguous(), scheme.bits).t().contiguous()


def dequantize_packed(
    packed: torch.Tensor,
    step: torch.Tensor,
    zero_packed: torch.Tensor | None,
    shape: tuple[int, int],
    scheme: PackedScheme,
) -> torch.Tensor:
    """The weight, in the step's dtype, from its stored tensors: `(q - zp) * step`."""
    out, cols = shape
    codes = unpack_int32(packed, scheme.bits, cols).to(torch.int16) + scheme.qmin
    values = grouped(codes.to(step.dtype), scheme)
    if zero_packed is not None:
        groups = scheme.groups(cols)
        zero = unpack_int32(zero_packed.t().contiguous(), scheme.bits, out).t()
        values = values - (zero.to(torch.int16) + scheme.qmin).to(step.dtype)[:, :groups, None]
    return (values * step.reshape(out, -1, 1)).reshape(shape)


def per_element(values: torch.Tensor, shape: tuple[int, int], scheme: PackedScheme) -> torch.Tensor:
    """One value per group `[out, groups]` broadcast to every element of a weight of `shape`."""
    out, cols = shape
    size = scheme.group_size or cols
    return values.reshape(out, -1, 1).expand(out, cols // size, size).reshape(shape)


def weights_args(scheme: PackedScheme) -> dict:
    """The `weights` block of a compressed-tensors config group, as the package writes it."""
    return {
        "dynamic": False,
        "group_size": scheme.group_size or None,
        "num_bits": scheme.bits,
        "strategy": scheme.strategy,
        "symmetric": scheme.symmetric,
        "type": "int",
    }


def scheme_of(args: dict) -> PackedScheme:
    """Inverse of `weights_args`, for the integer group and channel strategies this module
    reads (omitted fields take the package's defaults)."""
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "channel")
    if args.get("type", "int") != "int" or strategy not in ("group", "channel"):
        raise TvqError(f"unsupported compressed-tensors weights: {args}")
    group = int(args.get("group_size") or 0) if strategy == "group" else 0
    if strategy == "group" and group <= 0:
        raise TvqError(f"compressed-tensors group strategy without a group size: {args}")
    return PackedScheme(int(args.get("num_bits", 8)), group, bool(args.get("symmetric", True)))
