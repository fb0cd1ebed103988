"""One quantized part <-> its stored tensors (codes, scales, zero-points, super-scale).

The single place that knows how a `Quantized` is laid out on disk for each part option
(fp32 or compact scales, raw or entropy-coded codes); `format.part_layout` gives the sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import InternalError, TvqError
from ..quant import entropy, scale_codec, sizes
from ..quant.bitpack import pack_bits, unpack_bits
from ..quant.sizes import packed_nbytes
from ..quant.spec import Quantized, group_count
from .format import Part, TensorEntry, part_keys, superscale_key

if TYPE_CHECKING:
    from .reader import StoredStream


def encode_part(
    part: Part, name: str, shape: tuple[int, ...], q: Quantized
) -> list[tuple[str, np.ndarray | bytes]]:
    """The stored tensors of `q` (a tensor of `shape`), as (key, bytes) in layout order."""
    steps = None if q.step_codes is None else q.step_codes.numpy()
    return store_part(
        part,
        name,
        stored_codes(part, shape, q),
        q.scales.numpy(),
        q.zeros.numpy(),
        steps,
        q.super_scale,
    )


def stored_codes(part: Part, shape: tuple[int, ...], q: Quantized) -> np.ndarray | bytes:
    """What a dense part stores of its codes: bit-packed, or one zstd frame (`zstd-c`: each
    code centered on its group's zero-point first)."""
    codes = q.codes.numpy()
    if part.codec == "zstd-c":
        codes = entropy.center(codes, q.zeros.numpy(), shape, part.group_size, part.bits)
    if part.codec in sizes.CODED:
        return entropy.encode(codes, part.bits, part.codec)
    return pack_bits(codes, part.bits)


def store_part(
    part: Part,
    name: str,
    stored_codes: np.ndarray | bytes,
    scales: np.ndarray,
    zeros: np.ndarray,
    step_codes: np.ndarray | None,
    top: float,
) -> list[tuple[str, np.ndarray | bytes]]:
    """The stored tensors of a part whose codes are already packed or coded, in layout order."""
    codes_key, scales_key, zeros_key = part_keys(part, name)
    stored: list[tuple[str, np.ndarray | bytes]] = [(codes_key, stored_codes)]
    if part.scale_bits:
        stored.append((scales_key, pack_bits(step_codes, part.scale_bits)))
    else:
        stored.append((scales_key, scales))
    stored.append((zeros_key, pack_bits(zeros, part.bits)))
    if part.scale_bits:
        stored.append((superscale_key(part, name), np.array([top], np.float32)))
    return stored


def decode_part(
    part: Part,
    entry: TensorEntry,
    raw: Callable[[str], np.ndarray],
    where: str = "archive",
    codes_out: np.ndarray | None = None,
) -> Quantized:
    """Rebuild a part's `Quantized` from its stored bytes (`raw(key)` checks checksums); the
    codes go into `codes_out` where given (a reused buffer, see `bitpack.unpack_bits`)."""
    codes_key, scales_key, zeros_key = part_keys(part, entry.name)
    groups = group_count(entry.shape, part.group_size)
    zeros = unpack_bits(raw(zeros_key), part.bits, groups)
    if part.codec in sizes.CODED:
        try:
            codes = entropy.decode(raw(codes_key), part.bits, entry.numel, codes_out)
        except TvqError as exc:
            raise TvqError(f"{where}: {codes_key}: {exc}") from None
        if part.codec == "zstd-c":
            codes = entropy.uncenter(codes, zeros, entry.shape, part.group_size, part.bits)
    else:
        codes = unpack_bits(raw(codes_key), part.bits, entry.numel, codes_out)
    top = superscale(part, entry, raw, where) if part.scale_bits else 1.0
    scales, step_codes = _scales(part, raw(scales_key), groups, top, where, scales_key)
    return Quantized(torch.from_numpy(codes), scales, torch.from_numpy(zeros), step_codes, top)


def superscale(
    part: Part, entry: TensorEntry, raw: Callable[[str], np.ndarray], where: str
) -> float:
    """A part's super-scale (compact scales only), checked."""
    top = float(raw(superscale_key(part, entry.name)).view(np.float32)[0])
    if not np.isfinite(top) or top <= 0:
        key = part_keys(part, entry.name)[1]
        raise TvqError(f"{where}: invalid super-scale of {key} (damaged archive)")
    return top


def _scales(
    part: Part, stored: np.ndarray, groups: int, top: float, where: str, key: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`groups` scales from their stored bytes (step codes, or fp32), checked; and the step
    codes where compact."""
    step_codes = None
    if part.scale_bits:
        step_codes = torch.from_numpy(unpack_bits(stored, part.scale_bits, groups))
        scales = 1.0 / scale_codec.decode_steps(step_codes, top, part.scale_bits)
    else:
        scales_np = stored.view(np.float32)
        if scales_np.size != groups:
            raise TvqError(f"{where}: {key} has the wrong size (damaged archive)")
        scales = torch.from_numpy(scales_np.copy())
    if not torch.isfinite(scales).all() or (scales <= 0).any():
        raise TvqError(f"{where}: invalid scales in {key} (damaged archive)")
    return scales, step_codes


class PartRows:
    """A dense part whose groups tile its rows, decoded a block of whole rows at a time, in
    order (`next`), from its stored tensors read in pieces (`stream(key)`:
    `Archive.stream`): merge's large tensors, whose codes of every task would not fit in
    memory at once. The same values and checks as `decode_part` on the whole tensor; a block
    of rows must fill whole bytes of every stored tensor (a multiple of 8 rows does)."""

    def __init__(
        self,
        part: Part,
        entry: TensorEntry,
        stream: Callable[[str], StoredStream],
        raw: Callable[[str], np.ndarray],
        where: str,
    ):
        self.part, self.entry, self.where = part, entry, where
        self.cols = entry.shape[-1]
        self.groups_per_row = group_count((1, self.cols), part.group_size)
        self.codes_key, self.scales_key, zeros_key = part_keys(part, entry.name)
        self._codes = stream(self.codes_key)
        self._scales, self._zeros = stream(self.scales_key), stream(zeros_key)
        self._frame = None
        if part.codec in sizes.CODED:
            read, stored = self._codes.read, self._codes.left
            where_codes = f"{where}: {self.codes_key}"
            self._frame = entropy.FrameDecoder(read, stored, part.bits, entry.numel, where_codes)
        self._top = superscale(part, entry, raw, where) if part.scale_bits else 1.0
        self._rows = 0  # rows decoded so far

    def next(self, rows: int, codes_out: np.ndarray) -> Quantized:
        """The next `rows` rows: codes (into `codes_out`), scales and zero-points of their
        groups (`Quantized` of a [rows, cols] tensor)."""
        part, count, groups = self.part, rows * self.cols, rows * self.groups_per_row
        if rows % 8 and self._rows + rows != self.entry.rows:
            raise InternalError(f"{self.entry.name}: a block of {rows} rows ends inside a byte")
        zeros = unpack_bits(self._zeros.read(packed_nbytes(groups, part.bits)), part.bits, groups)
        scale_bytes = packed_nbytes(groups, part.scale_bits) if part.scale_bits else 4 * groups
        stored_scales = self._scales.read(scale_bytes)
        scales, step_codes = _scales(
            part, stored_scales, groups, self._top, self.where, self.scales_key
        )
        if self._frame is not None:
            codes = self._frame.next(count, codes_out)
            if part.codec == "zstd-c":
                shape = (rows, self.cols)
                codes = entropy.uncenter(codes, zeros, shape, part.group_size, part.bits)
        else:
            stored = self._codes.read(packed_nbytes(count, part.bits))
            codes = unpack_bits(stored, part.bits, count, codes_out)
        self._rows += rows
        if self._rows == self.entry.rows:
            self._close()
        return Quantized(
            torch.from_numpy(codes), scales, torch.from_numpy(zeros), step_codes, self._top
        )

    def _close(self) -> None:
        if self._frame is not None:
            self._frame.close()
        if self._codes.left or self._scales.left or self._zeros.left:
            raise InternalError(f"{self.entry.name}: rows decoded, but stored bytes are left")
