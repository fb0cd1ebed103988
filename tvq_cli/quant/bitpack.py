"""Dense bit-packing: n codes of b bits occupy exactly ceil(n*b/8) bytes.

Layout (little-endian bit order): code i occupies bits [i*b, i*b + b) of the stream, bit k of
the stream being bit (k mod 8) of byte k // 8. Codes may straddle byte boundaries (3, 5, 6, 7
bits). Eight codes of b bits fill exactly b bytes, so packing works on blocks of eight codes:
the eight one-byte codes of a block, read as one 64-bit word, are squeezed together in three
shift-and-mask steps (pairs, quads, the whole word: "SIMD within a register"), and the word's
low b bytes are the packed block. Every step is one vectorized numpy op over n/8 words whatever
the bit width, so all widths run at about the same speed, with no per-element Python loop and
no widening of the codes. Work is done in cache-sized blocks with buffers allocated once;
`pack_into` / `unpack_into` take caller-owned buffers so a hot loop allocates nothing. numpy
(not torch) because its ops never fan out to a thread team: the pack pipeline runs several
blocks at once in its own threads, and numpy releases the GIL while it works.
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import TvqError
from . import native
from .sizes import packed_nbytes

# Step i merges two lanes of `width` bits: the high lane's codes move down next to the low
# lane's codes, which sit in the low `bits << i` bits of the lane.
_STEPS = (
    (8, 0x00FF00FF00FF00FF),
    (16, 0x0000FFFF0000FFFF),
    (32, 0x00000000FFFFFFFF),
)
_ALL = (1 << 64) - 1
_LANES = {1: np.uint8, 2: np.uint16, 4: np.uint32}  # a packed block that fills one lane
_CHUNK = 1 << 17  # codes per block of work: the buffers stay in cache


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise TvqError(f"bits must be between 1 and 8, got {bits}")


def _lane_mask(lane: int, low_bits: int) -> np.uint64:
    """`low_bits` ones at the start of every `lane`-bit lane of a 64-bit word."""
    mask = 0
    for start in range(0, 64, lane):
        mask |= ((1 << low_bits) - 1) << start
    return np.uint64(mask)


@functools.lru_cache(maxsize=32)
def _gather_index(bits: int, blocks: int) -> np.ndarray:
    """Positions of the packed bytes of `blocks` blocks, in the words' byte order."""
    return (np.arange(blocks)[:, None] * 8 + np.arange(bits)).reshape(-1)


@functools.lru_cache(maxsize=32)
def _scatter_index(bits: int, blocks: int) -> np.ndarray:
    """For each byte of `blocks` words, its place in the stream (spare bytes: one past the end)."""
    byte = np.arange(8)
    index = np.arange(blocks)[:, None] * bits + byte
    return np.where(byte < bits, index, blocks * bits).reshape(-1)


def pack_into(codes: np.ndarray, bits: int, out: np.ndarray, scratch: np.ndarray) -> None:
    """Pack uint8 `codes` (length a multiple of 8) into `out` (len * bits / 8 bytes).

    `codes` is the work buffer and is overwritten; `scratch` is a uint64 buffer of at least
    len / 8 elements. Codes must be < 2**bits (true for the quantizer's output). The native
    kernel, where built, writes the same bytes in one pass.
    """
    if native.lib is not None:
        native.lib.pack(codes, bits, out)
        return
    if bits == 8:
        out[:] = codes
        return
    words = codes.view(np.uint64)
    high = scratch[: words.size]
    for step, (width, low_mask) in enumerate(_STEPS):
        np.bitwise_and(words, np.uint64(~low_mask & _ALL), out=high)
        np.right_shift(high, np.uint64(width - (bits << step)), out=high)
        np.bitwise_and(words, np.uint64(low_mask), out=words)
        np.bitwise_or(words, high, out=words)
    lane = _LANES.get(bits)
    if lane is not None:
        out.view(lane)[:] = codes.view(lane).reshape(-1, 8 // bits)[:, 0]
    else:  # a gather with a cached index beats numpy's strided copy of 3-7 byte rows
        np.take(codes, _gather_index(bits, out.size // bits), out=out)


def unpack_into(stream: np.ndarray, bits: int, words: np.ndarray, scratch: np.ndarray) -> None:
    """Inverse of `pack_into`: `stream` (len(words) * bits bytes) into uint64 `words`.

    Afterwards `words` viewed as uint8 are the codes, one per byte.
    """
    as_bytes = words.view(np.uint8).reshape(-1, 8)
    if bits == 8:
        as_bytes.reshape(-1)[:] = stream
        return
    lane = _LANES.get(bits)
    if lane is not None:
        words[:] = stream.view(lane)
    else:  # gather each block's bytes; the index sends a word's spare bytes to a zero byte
        padded = np.empty(stream.size + 1, np.uint8)
        padded[:-1] = stream
        padded[-1] = 0
        np.take(padded, _scatter_index(bits, words.size), out=as_bytes.reshape(-1))
    high = scratch[: words.size]
    for step in (2, 1, 0):
        width = _STEPS[step][0]
        kept = _lane_mask(2 * width, bits << step)
        np.right_shift(words, np.uint64(bits << step), out=high)
        np.bitwise_and(high, kept, out=high)
        np.left_shift(high, np.uint64(width), out=high)
        np.bitwise_and(words, kept, out=words)
        np.bitwise_or(words, high, out=words)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack a 1-D uint8 array of codes (< 2**bits) into a dense uint8 byte stream."""
    _check_bits(bits)
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    count = codes.size
    out = np.empty(-(-count // 8) * bits, np.uint8)
    work = np.empty(min(-(-count // 8) * 8, _CHUNK), np.uint8)
    scratch = np.empty(work.size // 8, np.uint64)
    for start in range(0, count, _CHUNK):
        size = min(_CHUNK, count - start)
        padded = -(-size // 8) * 8
        work[:size] = codes[start : start + size]
        work[size:padded] = 0
        first = start // 8 * bits
        pack_into(work[:padded], bits, out[first : first + padded // 8 * bits], scratch)
    return out[: packed_nbytes(count, bits)]


def unpack_bits(
    stream: np.ndarray, bits: int, count: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Inverse of `pack_bits`: recover `count` uint8 codes from a packed byte stream (into
    `out`, a reused buffer of at least `count` rounded up to 8 bytes, where given: a fresh
    multi-megabyte array costs a page fault per 4 KiB)."""
    _check_bits(bits)
    stream = np.ascontiguousarray(stream, dtype=np.uint8).reshape(-1)
    if stream.size != packed_nbytes(count, bits):
        raise TvqError(
            f"packed stream has {stream.size} bytes, expected {packed_nbytes(count, bits)} "
            f"for {count} codes of {bits} bits"
        )
    total = -(-count // 8) * 8
    out = np.empty(total, np.uint8) if out is None else out[:total]
    if native.lib is not None:  # the same codes in one pass
        whole = count // 8 * 8
        native.lib.unpack(stream[: whole // 8 * bits], bits, out[:whole])
        if whole < total:
            tail = np.zeros(bits, np.uint8)
            tail[: stream.size - whole // 8 * bits] = stream[whole // 8 * bits :]
            native.lib.unpack(tail, bits, out[whole:])
        return out[:count]
    words = np.empty(min(total, _CHUNK) // 8, np.uint64)
    scratch = np.empty_like(words)
    for start in range(0, total, _CHUNK):
        blocks = min(_CHUNK, total - start) // 8
        chunk = stream[start // 8 * bits : (start // 8 + blocks) * bits]
        if chunk.size < blocks * bits:  # the last block is partial: pad it with zeros
            chunk = np.concatenate([chunk, np.zeros(blocks * bits - chunk.size, np.uint8)])
        unpack_into(chunk, bits, words[:blocks], scratch)
        out[start : start + blocks * 8] = words[:blocks].view(np.uint8)
    return out[:count]
