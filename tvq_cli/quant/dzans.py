"""The low-rate codec `dzans`: a dead-zone uniform quantizer whose codes are rANS-coded.

Below about two bits per weight a task vector is best stored as entropy-coded scalar
quantization: one step per tensor, most codes zero, each zero costing a fraction of a bit under
a static per-tensor model (the "sparse" regime is the large-step end of the same quantizer). The
reconstruction of each nonzero code is least-squares within its bin class, and a per-tensor gain
restores the task vector's norm, which keeps a sparse reconstruction from pulling the model back
toward the pretrained one (docs/fidelity.md measures both). One tensor's codes are a
self-delimiting *record* (exact bytes: docs/format.md, "Low-rate parts").

`encode` / `decode` are the record; `measure` gives every candidate setting's exact size bound
and squared error from one sort of the tensor (for the allocator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InternalError, TvqError
from . import rans

J_OFFSET = 200  # stored step exponent: j + J_OFFSET in 1..255; 0 marks an all-zero record
STEP_ROOTS = np.array([1.0, 2**0.25, 2**0.5, 2**0.75], np.float32)  # 2^(m/4) as float32
MAX_ALPHABET = 127
ESCAPE_ALPHABETS = (8, 16, 32, 64, 127)
MAX_MAGNITUDE = (1 << 31) - 1  # largest code magnitude a record holds
MEASURED_MAGNITUDE = 1 << 12  # settings whose codes go beyond are too fine to be worth measuring
DEADZONES = (0, 8)  # dead-zone codes the allocator tries: z = 0.5 (plain rounding) and 0.75
J_SPAN = (-28, 14)  # step exponents tried around the tensor's RMS, in quarter octaves
GAIN_BELOW = 0.9  # energy share kept below which a record restores the norm (docs/fidelity.md)
_LOG2_SLACK = math.log2(1 + 2.0**-15)  # rANS's worst loss per symbol (docs/format.md)


@dataclass(frozen=True)
class Setting:
    """One tensor's quantizer: step 2^(j/4) and dead zone z = 0.5 + cz/32; j None: all zero."""

    j: int | None
    cz: int = 0

    def __post_init__(self) -> None:
        if self.j is not None and not (1 <= self.j + J_OFFSET <= 255 and 0 <= self.cz <= 255):
            raise InternalError(f"dzans setting out of range: {self}")

    @property
    def step(self) -> float:
        return step_of(self.j)

    @property
    def deadzone(self) -> float:
        return 0.5 + self.cz / 32


ZERO = Setting(None)


def step_of(j: int) -> float:
    """2^(j/4), exactly as every decoder computes it: a float32 root times a power of two."""
    return float(np.ldexp(STEP_ROOTS[j % 4], j // 4))


def offset_of(code: int) -> float:
    return (code + 0.5) / 256


def gain_of(code: int) -> float:
    return 1 + code / 128


def magnitudes(absx: np.ndarray, step: float, z: float) -> np.ndarray:
    """k = #{m >= 0 : |x| >= (z + m) * step} per element of `absx` (float64), exactly: the
    products are exact in float64, so a division's rounding is corrected both ways."""
    k = np.floor(absx / step - z) + 1
    np.maximum(k, 0, out=k)
    k -= (k >= 1) & (absx < (z + k - 1) * step)
    k += absx >= (z + k) * step
    return k.astype(np.int64)


def levels(k: np.ndarray, setting: Setting, c1: int, c2: int, cg: int) -> np.ndarray:
    """float32 reconstruction of magnitudes `k` >= 1: ((z + k - 1 + g_k) * step) * G in float64."""
    g = np.where(k == 1, offset_of(c1), offset_of(c2))
    return (((setting.deadzone + (k - 1) + g) * setting.step) * gain_of(cg)).astype(np.float32)


def table_bytes(counts: np.ndarray) -> bytes:
    """A magnitude model as stored: one byte per symbol, a 4.4 minifloat (`table_values`) of
    the symbol's count scaled so that the largest is about 2^19 (relative precision 1/32; the
    code length it costs is under 0.001 bit per symbol). Plain Python: tables are short, and
    the allocator builds one per candidate setting."""
    counts = counts.tolist() if isinstance(counts, np.ndarray) else list(counts)
    scale = 2.0**19 / max(counts)
    out = bytearray()
    for count in counts:
        value = count * scale
        exponent = min(15, max(0, math.floor(math.log2(max(value, 16.0))) - 4))
        mantissa = round(value / 2.0**exponent) - 16
        if mantissa > 15:  # rounded up to the next power of two
            exponent, mantissa = (exponent + 1, 0) if exponent < 15 else (15, 15)
        out.append(exponent << 4 | max(0, mantissa))
    return bytes(out)


def table_values(stored: bytes | memoryview) -> list[int]:
    """The integers a stored table stands for: byte (e << 4 | m) is (16 + m) << e."""
    return [(16 + (b & 15)) << (b >> 4) for b in bytes(stored)]


def frequencies(values: list[int]) -> np.ndarray:
    """The rANS table of stored values: shares of 2^16 rounded down, at least 1 each, the
    difference given to (or taken from) the first largest."""
    total = sum(values)
    freqs = [max(1, v * rans.PROB_TOTAL // total) for v in values]
    freqs[freqs.index(max(freqs))] += rans.PROB_TOTAL - sum(freqs)
    return np.array(freqs, np.int64)


def normalized(counts: np.ndarray) -> np.ndarray:
    """The frequency table a record stores for these symbol counts (and a decoder reads)."""
    return frequencies(table_values(table_bytes(counts)))


def row_frequency(nonzero_rows: int, rows: int) -> int:
    """The row model's frequency of "has a nonzero code"; 0: every row has one (no row flags)."""
    if nonzero_rows == rows:
        return 0
    return min(rans.PROB_TOTAL - 1, max(1, round(nonzero_rows * rans.PROB_TOTAL / rows)))


def _code_bits(counts: np.ndarray, freqs: np.ndarray) -> float:
    """Code length of symbols with these counts under these frequencies (a short table)."""
    return sum(
        c * math.log2(rans.PROB_TOTAL / f)
        for c, f in zip(counts.tolist(), freqs.tolist(), strict=True)
        if c
    )


def _escape_bits(values: np.ndarray, counts: np.ndarray | None = None) -> int:
    """Exp-Golomb(0) bits of `values` (>= 0), each weighted by `counts` if given."""
    lengths = 2 * np.floor(np.log2(values + 1)).astype(np.int64) + 1
    return int((lengths * (1 if counts is None else counts)).sum())


def alphabet(histogram: np.ndarray) -> tuple[int, bool]:
    """The magnitude alphabet for a histogram of magnitudes (index = magnitude): every
    magnitude its own symbol when the largest is at most 126; else the A of ESCAPE_ALPHABETS
    with the fewest table, code and escape bits, whose symbol A - 1 means "A - 1 or more" (the
    rest Exp-Golomb coded: only heavy tails need it)."""
    top = histogram.size - 1
    if top + 1 <= MAX_ALPHABET:
        return top + 1, False
    best = None
    for size in ESCAPE_ALPHABETS:
        counts = _folded(histogram, size)
        tail = histogram[size - 1 :]
        cost = 8 * size + _code_bits(counts, normalized(counts))
        cost += _escape_bits(np.arange(tail.size), tail)
        if best is None or cost < best[0]:
            best = (cost, size)
    return best[1], True


def _folded(histogram: np.ndarray, size: int) -> np.ndarray:
    counts = histogram[:size].copy()
    counts[size - 1] = histogram[size - 1 :].sum()
    return counts


def stream_bound(bits: float, symbols: int) -> int:
    """Bytes a rANS stream of `symbols` takes at most, given their code length under its table:
    every lane's state (8 bytes) plus whole 32-bit words (docs/format.md)."""
    words = math.floor((bits * (1 + 1e-9) + symbols * _LOG2_SLACK + 1e-6) / 32)
    return 8 * rans.lane_count(symbols) + 4 * words


def varint_len(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def record_bound(numel: int, rows: int) -> int:
    """The most bytes a record of a tensor of `numel` elements in `rows` rows can take (side
    information, every rANS word and lane state, a sign and the longest escape per element)."""
    side = 8 + MAX_ALPHABET + (2 if rows > 1 else 0)
    streams = 8 * rans.lane_count(rows) + 4 * rows + 8 * rans.lane_count(numel) + 4 * numel
    return side + 30 + streams + 8 * numel


# --- records ---------------------------------------------------------------------------------
@dataclass
class Encoded:
    record: bytes
    sq_error: float  # ||x_hat - x||^2 of the reconstruction the record decodes to
    values: np.ndarray | None = None  # that reconstruction (float32, flat), when asked for


def encode(x: np.ndarray, rows: int, setting: Setting, want_values: bool = False) -> Encoded:
    """The record of `x` (float32, flat, `rows` rows) under `setting`."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    absx = np.abs(x).astype(np.float64)
    total = _energy(absx)
    k = (
        None
        if setting.j is None or total == 0
        else magnitudes(absx, setting.step, setting.deadzone)
    )
    if k is None or not k.any():
        return Encoded(b"\0", total, np.zeros_like(x) if want_values else None)
    if int(k.max()) > MAX_MAGNITUDE:
        raise TvqError(f"a task vector value is too large for the step {setting.step:g}")
    z, step = setting.deadzone, setting.step
    nonzero = k > 0
    frac = absx[nonzero] / step - z - (k[nonzero] - 1)
    ones = k[nonzero] == 1
    c1, c2 = _offset_code(frac[ones]), _offset_code(frac[~ones])
    plain = levels(k[nonzero], setting, c1, c2, 0).astype(np.float64)
    cg = _gain_code(total, _energy(plain))
    value = levels(k[nonzero], setting, c1, c2, cg)
    error = float(np.square(absx[nonzero] - value, dtype=np.float64).sum())
    error += total - _energy(absx[nonzero])
    cols = x.size // rows
    rows_nz = k.reshape(rows, cols).any(axis=1)
    mags = k.reshape(rows, cols)[rows_nz].reshape(-1)
    side = bytearray([setting.j + J_OFFSET, setting.cz, c1, c2, cg])
    streams = b""
    if rows > 1:
        p = row_frequency(int(rows_nz.sum()), rows)
        side += p.to_bytes(2, "little")
        if p:
            table = np.array([rans.PROB_TOTAL - p, p])
            streams += _with_length(rans.encode(rows_nz.astype(np.uint8), table))
    histogram = np.bincount(mags)
    size, escaping = alphabet(histogram)
    freqs = normalized(_folded(histogram, size))  # what the stored table stands for
    side.append(size | (0x80 if escaping else 0))
    side += table_bytes(_folded(histogram, size))
    symbols = np.minimum(mags, size - 1).astype(np.uint8)
    streams += _with_length(rans.encode(symbols, freqs))
    signs = x.reshape(rows, cols)[rows_nz].reshape(-1)[mags > 0] < 0
    escapes = mags[mags >= size - 1] - (size - 1) if escaping else np.zeros(0, np.int64)
    tail = np.packbits(np.concatenate([signs, _exp_golomb(escapes)]), bitorder="little")
    record = bytes(side) + streams + _with_length(tail.tobytes())
    values = None
    if want_values:
        values = np.zeros_like(x)
        values[nonzero] = np.where(x[nonzero] < 0, -value, value)
    return Encoded(record, error, values)


def _energy(x: np.ndarray) -> float:
    """Sum of squares (not `np.dot`: BLAS threads spin on a loaded machine, 100x slower)."""
    return float(np.square(x, dtype=np.float64).sum())


def _offset_code(frac: np.ndarray) -> int:
    """The least-squares offset of a bin class as a byte: floor(256 * mean position)."""
    if frac.size == 0:
        return 128
    return min(255, max(0, math.floor(256 * float(frac.mean()))))


def _gain_code(target: float, plain: float) -> int:
    """The gain byte that brings the reconstruction's norm closest to the task vector's, where
    the reconstruction keeps less than `GAIN_BELOW` of its energy (the low-rate end, where the
    gain buys accuracy; above, it would only add error)."""
    if plain <= 0 or plain >= GAIN_BELOW * target:
        return 0
    return min(255, max(0, round(128 * (math.sqrt(target / plain) - 1))))


def _with_length(data: bytes) -> bytes:
    return _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _exp_golomb(values: np.ndarray) -> np.ndarray:
    """Exp-Golomb(0) codes of `values` (>= 0) as bits, in order: len(v + 1) - 1 zeros, then
    v + 1 most significant bit first."""
    if values.size == 0:
        return np.zeros(0, bool)
    word = values.astype(np.int64) + 1
    width = np.floor(np.log2(word)).astype(np.int64) + 1
    start = np.concatenate([[0], np.cumsum(2 * width - 1)[:-1]])
    bits = np.zeros(int((2 * width - 1).sum()), bool)
    for b in range(int(width.max())):
        has = b < width
        # bit b of the suffix (MSB first) is bit (width - 1 - b) of the word
        bits[(start + width - 1 + b)[has]] = (word[has] >> (width[has] - 1 - b)) & 1
    return bits


@dataclass
class RecordInfo:
    """A parsed record: its setting and side information, where its streams lie, its end."""

    setting: Setting
    c1: int = 0
    c2: int = 0
    cg: int = 0
    row_p: int = 0
    size: int = 0  # alphabet
    escaping: bool = False
    freqs: np.ndarray | None = None
    row_stream: memoryview | None = None
    stream: memoryview | None = None
    tail: memoryview | None = None
    start: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def step(self) -> float:
        """The reconstruction's step, gain included (0 for an all-zero record)."""
        return 0.0 if self.setting.j is None else self.setting.step * gain_of(self.cg)


class _Reader:
    def __init__(self, data: memoryview, pos: int):
        self.data, self.pos = data, pos

    def take(self, count: int) -> memoryview:
        if count < 0 or self.pos + count > len(self.data):
            raise TvqError("low-rate record runs past its end (damaged)")
        out = self.data[self.pos : self.pos + count]
        self.pos += count
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = 0
        for shift in range(0, 64, 7):
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise TvqError("low-rate record has a malformed length (damaged)")


def parse(data: memoryview | bytes, pos: int, rows: int) -> RecordInfo:
    """The record that starts at `pos` of `data`, for a tensor of `rows` rows (streams not
    decoded: skipping records of a frame reads only their side information)."""
    reader = _Reader(memoryview(data), pos)
    jc = reader.byte()
    if jc == 0:
        return RecordInfo(ZERO, start=pos, end=reader.pos)
    setting = Setting(jc - J_OFFSET, reader.byte())
    info = RecordInfo(setting, *reader.take(3), start=pos)
    if rows > 1:
        info.row_p = int.from_bytes(reader.take(2), "little")
    code = reader.byte()
    info.size, info.escaping = code & 0x7F, bool(code & 0x80)
    if not 2 <= info.size <= MAX_ALPHABET:
        raise TvqError("low-rate record has a bad alphabet (damaged)")
    info.freqs = frequencies(table_values(reader.take(info.size)))
    if rows > 1 and info.row_p:
        info.row_stream = reader.take(reader.varint())
    info.stream = reader.take(reader.varint())
    info.tail = reader.take(reader.varint())
    info.end = reader.pos
    return info


def decode(info: RecordInfo, rows: int, cols: int) -> np.ndarray:
    """The float32 values (flat) of a parsed record; TvqError, never wrong values, if any part
    of it is inconsistent."""
    out = np.zeros(rows * cols, np.float32)
    if info.setting.j is None:
        return out
    if out.size == 0:
        raise TvqError("low-rate record of an empty tensor holds codes (damaged)")
    if rows > 1 and info.row_p:
        table = np.array([rans.PROB_TOTAL - info.row_p, info.row_p])
        rows_nz = rans.decode(info.row_stream, table, rows).astype(bool)
    else:
        rows_nz = np.ones(rows, bool)
    symbols = rans.decode(info.stream, info.freqs, int(rows_nz.sum()) * cols)
    if (symbols >= info.size).any():
        raise TvqError("low-rate record holds an out-of-range symbol (damaged)")
    if not symbols.reshape(-1, cols).any(axis=1).all() or rows_nz.sum() == 0:
        raise TvqError("low-rate record flags a row that has no nonzero code (damaged)")
    mags = symbols.astype(np.int64)
    nonzero = np.flatnonzero(mags)
    bits = np.unpackbits(np.frombuffer(info.tail, np.uint8), bitorder="little")
    if bits.size < nonzero.size:
        raise TvqError("low-rate record's signs are cut short (damaged)")
    used = nonzero.size
    if info.escaping:
        escaped = np.flatnonzero(mags == info.size - 1)
        values, used = _read_exp_golomb(bits, used, escaped.size)
        mags[escaped] += values
        if escaped.size and int(mags[escaped].max()) > MAX_MAGNITUDE:
            raise TvqError("low-rate record holds an out-of-range code (damaged)")
    if -(-used // 8) != len(info.tail) or bits[used:].any():
        raise TvqError("low-rate record's sign and escape bits do not end where stated (damaged)")
    value = levels(mags[nonzero], info.setting, info.c1, info.c2, info.cg)
    negative = bits[: nonzero.size].astype(bool)
    value[negative] = -value[negative]
    rows_out = out.reshape(rows, cols)
    kept = np.zeros(mags.size, np.float32)
    kept[nonzero] = value
    rows_out[rows_nz] = kept.reshape(-1, cols)
    return out


def _read_exp_golomb(bits: np.ndarray, pos: int, count: int) -> tuple[np.ndarray, int]:
    """`count` Exp-Golomb(0) values from `bits` at `pos`, and the position after them."""
    values = np.zeros(count, np.int64)
    ones = np.flatnonzero(bits[pos:]) + pos
    for i in range(count):
        at = np.searchsorted(ones, pos)
        if at >= ones.size:
            raise TvqError("low-rate record's escape bits are cut short (damaged)")
        zeros = int(ones[at]) - pos
        if zeros > 31 or ones[at] + zeros + 1 > bits.size:
            raise TvqError("low-rate record holds a malformed escape (damaged)")
        word = 0
        for bit in bits[ones[at] : ones[at] + zeros + 1]:
            word = (word << 1) | int(bit)
        values[i] = word - 1
        pos = int(ones[at]) + zeros + 1
    return values, pos


# --- measuring settings (the allocator) -------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    setting: Setting
    nbytes: int  # an upper bound of the record's size (exact within a few bytes)
    sq_error: float  # of the least-squares reconstruction, before the gain
    final_error: float  # with the gain the record will carry (what the task vector gets)


def candidates(rms: float, deadzones: tuple[int, ...] = DEADZONES) -> list[Setting]:
    """The settings the allocator tries: steps around the RMS, each dead zone, and all-zero."""
    if rms <= 0:
        return [ZERO]
    j0 = round(4 * math.log2(rms))
    out = [ZERO]
    for cz in deadzones:
        for j in range(j0 + J_SPAN[0], j0 + J_SPAN[1] + 1):
            if 1 <= j + J_OFFSET <= 255:
                out.append(Setting(j, cz))
    return out


def measure(x: np.ndarray, rows: int, settings: list[Setting] | None = None) -> list[Measured]:
    """Size bound and squared error of every setting (default `candidates`), from one sort of
    |x| and prefix sums: each setting's bin counts and sums are a search away."""
    x = np.asarray(x, np.float32).reshape(-1)
    if x.size == 0:
        return [Measured(ZERO, 1, 0.0, 0.0)]
    cols = x.size // rows
    absx = np.sort(np.abs(x).astype(np.float64))
    s1 = np.concatenate([[0.0], np.cumsum(absx)])
    s2 = np.concatenate([[0.0], np.cumsum(absx * absx)])
    total = float(s2[-1])
    row_max = np.sort(np.abs(x).reshape(rows, cols).max(axis=1).astype(np.float64))
    if settings is None:
        settings = candidates(math.sqrt(total / x.size) if x.size else 0.0)
    out, empty = [], set()  # dead zones whose steps are already coarse enough to zero all
    for setting in settings:
        if setting.cz in empty and setting.j is not None:
            continue
        m = _measure_one(setting, absx, s1, s2, total, row_max, rows, cols)
        if m is not None and m.setting.j is None and setting.j is not None:
            empty.add(setting.cz)  # (settings come from fine to coarse: the rest are zero too)
            continue
        if m is not None:
            out.append(m)
    return out


def _measure_one(
    setting: Setting,
    absx: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    total: float,
    row_max: np.ndarray,
    rows: int,
    cols: int,
) -> Measured | None:
    n = absx.size
    zero = Measured(ZERO, 1, total, total)
    if setting.j is None or total == 0:
        return zero
    step, z = setting.step, setting.deadzone
    top = int(magnitudes(absx[-1:], step, z)[0])
    if top == 0:
        return zero
    if top > MEASURED_MAGNITUDE:
        return None
    edges = np.searchsorted(absx, (z + np.arange(top + 1)) * step, side="left")
    counts = np.diff(edges)  # counts[k - 1]: elements of magnitude k
    sums1 = np.diff(s1[edges])
    sums2 = np.diff(s2[edges])
    mags = np.arange(1, top + 1)
    c1 = _class_offset(counts[:1], sums1[:1], mags[:1], step, z)
    c2 = _class_offset(counts[1:], sums1[1:], mags[1:], step, z)
    plain = levels(mags, setting, c1, c2, 0).astype(np.float64)
    below = float(s2[edges[0]])
    sq_error = below + float((sums2 - 2 * plain * sums1 + counts * plain * plain).sum())
    cg = _gain_code(total, float((counts * plain * plain).sum()))
    gained = levels(mags, setting, c1, c2, cg).astype(np.float64)
    final = below + float((sums2 - 2 * gained * sums1 + counts * gained * gained).sum())
    nonzero = n - int(edges[0])
    rows_nz = rows - int(np.searchsorted(row_max, z * step, side="left"))
    symbols = rows_nz * cols
    histogram = np.concatenate([[symbols - nonzero], counts])
    size, escaping = alphabet(histogram)
    folded = _folded(histogram, size)
    nbytes = 6 + size + (2 if rows > 1 else 0)
    stream = stream_bound(_code_bits(folded, normalized(folded)), symbols)
    nbytes += varint_len(stream) + stream
    p = row_frequency(rows_nz, rows) if rows > 1 else 0
    if p:
        flags = np.array([rows - rows_nz, rows_nz])
        row_stream = stream_bound(_code_bits(flags, np.array([rans.PROB_TOTAL - p, p])), rows)
        nbytes += varint_len(row_stream) + row_stream
    tail_bits = nonzero
    if escaping:
        tail = histogram[size - 1 :]
        tail_bits += _escape_bits(np.arange(tail.size), tail)
    tail = -(-tail_bits // 8)
    nbytes += varint_len(tail) + tail
    return Measured(setting, nbytes, sq_error, final)


def _class_offset(counts, sums, mags, step: float, z: float) -> int:
    """`_offset_code` of a bin class from its counts and sums of |x| per magnitude."""
    count = int(counts.sum())
    if count == 0:
        return 128
    position = (float(sums.sum()) / step - float((counts * (z + mags - 1)).sum())) / count
    return min(255, max(0, math.floor(256 * position)))
