"""Dense bit-packing: n codes of b bits occupy exactly ceil(n*b/8) bytes.

Layout (little-endian bit order): code i occupies bits [i*b, i*b + b) of the stream, bit k of
the stream being bit (k mod 8) of byte k // 8. Codes may straddle byte boundaries (3, 5, 6, 7
bits). Eight codes of b bits fill exactly b bytes, so packing works on blocks of eight codes
held in one uint64 — fully vectorized, no per-element Python loop.
"""

from __future__ import annotations

import numpy as np

from ..errors import TvqError


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for `count` codes of `bits` bits."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise TvqError(f"bits must be between 1 and 8, got {bits}")


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack a 1-D uint8 array of codes (< 2**bits) into a dense uint8 byte stream."""
    _check_bits(bits)
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    count = codes.size
    if bits == 8:
        return codes.copy()
    if bits == 4:
        padded = codes if count % 2 == 0 else np.append(codes, np.uint8(0))
        pairs = padded.reshape(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)
    if bits in (1, 2):
        per_byte = 8 // bits
        pad = (-count) % per_byte
        padded = np.concatenate([codes, np.zeros(pad, np.uint8)]) if pad else codes
        groups = padded.reshape(-1, per_byte)
        out = groups[:, 0].copy()
        for j in range(1, per_byte):
            out |= groups[:, j] << (bits * j)
        return out
    pad = (-count) % 8
    padded = np.concatenate([codes, np.zeros(pad, np.uint8)]) if pad else codes
    blocks = padded.reshape(-1, 8).astype(np.uint64)
    words = blocks[:, 0].copy()
    for j in range(1, 8):
        words |= blocks[:, j] << np.uint64(bits * j)
    stream = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits]
    return np.ascontiguousarray(stream).reshape(-1)[: packed_nbytes(count, bits)]


def unpack_bits(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: recover `count` uint8 codes from a packed byte stream."""
    _check_bits(bits)
    stream = np.ascontiguousarray(stream, dtype=np.uint8).reshape(-1)
    if stream.size != packed_nbytes(count, bits):
        raise TvqError(
            f"packed stream has {stream.size} bytes, expected {packed_nbytes(count, bits)} "
            f"for {count} codes of {bits} bits"
        )
    mask = np.uint8((1 << bits) - 1)
    if bits == 8:
        return stream.copy()
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        out = np.empty((stream.size, per_byte), np.uint8)
        for j in range(per_byte):
            out[:, j] = (stream >> (bits * j)) & mask
        return out.reshape(-1)[:count]
    nblocks = (count + 7) // 8
    full = np.zeros(nblocks * bits, np.uint8)
    full[: stream.size] = stream
    padded = np.zeros((nblocks, 8), np.uint8)
    padded[:, :bits] = full.reshape(nblocks, bits)
    words = padded.view("<u8").reshape(-1)
    out = np.empty((nblocks, 8), np.uint8)
    wmask = np.uint64((1 << bits) - 1)
    for j in range(8):
        out[:, j] = (words >> np.uint64(bits * j)) & wmask
    return out.reshape(-1)[:count]
