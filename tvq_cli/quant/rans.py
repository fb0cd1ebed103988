"""Static-model rANS streams: the entropy coder of the low-rate codec (docs/format.md).

Why rANS: at low rate most codes are zero, with probability 0.9 to 0.999, and a zero must cost
a fraction of a bit; byte-oriented coders (zstd's Huffman stage) pay at least one bit per
symbol, or lose 5-90% to run-length workarounds on small tensors (docs/format.md has the
measurement). A static table per stream is enough: adaptive models gained under 0.1%.

The C module (`_rans.c`) and the numpy reference here write the same bytes; the reference runs
where no C compiler was available at install, vectorized over the stream's lanes (one lane per
65536 symbols), so it is slow on small streams and tolerable on large ones.
"""

from __future__ import annotations

import numpy as np

from ..errors import TvqError

try:
    from . import _rans as lib
except ImportError:  # built without a C compiler
    lib = None

PROB_BITS = 16
PROB_TOTAL = 1 << PROB_BITS
LANE_SYMBOLS = 1 << 16
STATE_LOW = np.uint64(1 << 31)
_MASK32 = np.uint64(0xFFFFFFFF)


def built() -> bool:
    return lib is not None


def lane_count(n: int) -> int:
    return max(1, -(-n // LANE_SYMBOLS))


def check_table(freqs: np.ndarray) -> np.ndarray:
    """The table as uint16 (1 to 256 entries summing to 2^16); TvqError otherwise."""
    freqs = np.asarray(freqs)
    if not 1 <= freqs.size <= 256 or int(freqs.astype(np.int64).sum()) != PROB_TOTAL:
        raise TvqError("rANS frequency table is malformed (damaged)")
    return freqs.astype("<u2")


def encode(symbols: np.ndarray, freqs: np.ndarray) -> bytes:
    """The stream of `symbols` (uint8, each with a nonzero frequency) under `freqs`."""
    symbols = np.ascontiguousarray(symbols, np.uint8)
    table = check_table(freqs)
    if lib is not None:
        return lib.encode(symbols, table)
    return _encode(symbols, table.astype(np.uint64))


def decode(stream: bytes | np.ndarray, freqs: np.ndarray, count: int) -> np.ndarray:
    """`count` symbols of `stream`; TvqError if the stream was not written for them."""
    table = check_table(freqs)
    out = np.empty(count, np.uint8)
    data = np.frombuffer(stream, np.uint8)
    ok = lib.decode(data, table, out) if lib is not None else _decode(data, table, out)
    if not ok:
        raise TvqError("rANS stream is damaged")
    return out


def _steps(n: int, lanes: int) -> list[tuple[int, int]]:
    """(first symbol, lanes taking part) of each step: symbol i is lane i % lanes's."""
    return [(first, min(lanes, n - first)) for first in range(0, n, lanes)]


def _encode(symbols: np.ndarray, freqs: np.ndarray) -> bytes:
    n = symbols.size
    lanes = lane_count(n)
    if symbols.size and (int(symbols.max()) >= freqs.size or not freqs[symbols].all()):
        raise ValueError("a symbol is outside the table or has frequency 0")
    start = np.concatenate([[0], np.cumsum(freqs)[:-1]]).astype(np.uint64)
    state = np.full(lanes, STATE_LOW, np.uint64)
    emitted: list[np.ndarray] = []  # in emission order; the decoder reads them reversed
    for first, width in reversed(_steps(n, lanes)):
        sym = symbols[first : first + width]
        f = freqs[sym]
        x = state[:width]
        renorm = np.flatnonzero(x >= (f << np.uint64(47)))
        if renorm.size:
            emitted.append((x[renorm] & _MASK32)[::-1].astype("<u4"))
            x[renorm] >>= np.uint64(32)
        x[:] = ((x // f) << np.uint64(PROB_BITS)) + (x % f) + start[sym]
    words = np.concatenate(emitted)[::-1] if emitted else np.zeros(0, "<u4")
    return state.astype("<u8").tobytes() + words.tobytes()


def _decode(data: np.ndarray, freqs: np.ndarray, out: np.ndarray) -> bool:
    n = out.size
    lanes = lane_count(n)
    if data.size < 8 * lanes or (data.size - 8 * lanes) % 4:
        return False
    state = data[: 8 * lanes].view("<u8").astype(np.uint64)
    if (state < STATE_LOW).any() or (state >> np.uint64(63)).any():
        return False
    words = data[8 * lanes :].view("<u4").astype(np.uint64)
    f64 = freqs.astype(np.uint64)
    start = np.concatenate([[0], np.cumsum(f64)[:-1]]).astype(np.uint64)
    lookup = np.repeat(np.arange(freqs.size, dtype=np.uint8), freqs)
    read = 0
    slot_mask = np.uint64(PROB_TOTAL - 1)
    for first, width in _steps(n, lanes):
        x = state[:width]
        slot = x & slot_mask
        sym = lookup[slot]
        x[:] = f64[sym] * (x >> np.uint64(PROB_BITS)) + slot - start[sym]
        renorm = np.flatnonzero(x < STATE_LOW)
        if renorm.size:
            if read + renorm.size > words.size:
                return False
            x[renorm] = (x[renorm] << np.uint64(32)) | words[read : read + renorm.size]
            read += renorm.size
        out[first : first + width] = sym
    return read == words.size and bool((state == STATE_LOW).all())
