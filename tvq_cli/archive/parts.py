"""One quantized part <-> its stored tensors (codes, scales, zero-points, super-scale).

The single place that knows how a `Quantized` is laid out on disk for each part option
(fp32 or compact scales, raw or entropy-coded codes); `format.part_layout` gives the sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import TvqError
from ..quant import entropy, scale_codec, sizes
from ..quant.bitpack import pack_bits, unpack_bits
from ..quant.spec import Quantized, group_count
from .format import Part, TensorEntry, part_keys, superscale_key


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
    step_codes = None
    top = 1.0
    if part.scale_bits:
        top = float(raw(superscale_key(part, entry.name)).view(np.float32)[0])
        if not np.isfinite(top) or top <= 0:
            raise TvqError(f"{where}: invalid super-scale of {scales_key} (damaged archive)")
        step_codes = torch.from_numpy(unpack_bits(raw(scales_key), part.scale_bits, groups))
        scales = 1.0 / scale_codec.decode_steps(step_codes, top, part.scale_bits)
    else:
        scales_np = raw(scales_key).view(np.float32)
        if scales_np.size != groups:
            raise TvqError(f"{where}: {scales_key} has the wrong size (damaged archive)")
        scales = torch.from_numpy(scales_np.copy())
    if not torch.isfinite(scales).all() or (scales <= 0).any():
        raise TvqError(f"{where}: invalid scales in {scales_key} (damaged archive)")
    return Quantized(torch.from_numpy(codes), scales, torch.from_numpy(zeros), step_codes, top)
