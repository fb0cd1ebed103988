"""The low-rate codec: rANS streams (C and numpy write the same bytes), dzans records (round
trips, sizes within their bounds, damage reported), and the format's frames and records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvq_cli import open_archive
from tvq_cli.archive.format import ArchiveHeader, Part, TensorEntry
from tvq_cli.archive.writer import ArchiveWriter
from tvq_cli.errors import TvqError
from tvq_cli.pack.frames import Frames
from tvq_cli.pack.packer import coded_outputs
from tvq_cli.quant import dzans, rans
from tvq_cli.quant.quantizer import dequantize, quantize

needs_c = pytest.mark.skipif(not rans.built(), reason="the C coder was not built")


def _table(symbols: np.ndarray, size: int) -> np.ndarray:
    counts = np.bincount(symbols, minlength=size)
    counts[0] += 1  # a table for no symbols at all
    return dzans.normalized(counts)


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(0, 140_000),
    size=st.integers(2, 127),  # a record's alphabets (frequencies are uint16: at least two)
    skew=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_rans_round_trips_and_both_coders_write_the_same_bytes(count, size, skew, seed):
    """Streams of every length (one lane per 65536 symbols: 0, 1, 2, 3 lanes), skewed or flat
    tables; the numpy reference and the C module agree byte for byte, in both directions."""
    rng = np.random.default_rng(seed)
    symbols = np.minimum(rng.geometric(skew, count) - 1, size - 1).astype(np.uint8)
    freqs = _table(symbols, size)
    reference = rans._encode(symbols, freqs.astype(np.uint64))
    if rans.built():
        assert rans.lib.encode(symbols, freqs.astype("<u2")) == reference
    assert np.array_equal(rans.decode(reference, freqs, count), symbols)
    out = np.empty(count, np.uint8)
    assert rans._decode(np.frombuffer(reference, np.uint8), freqs.astype("<u2"), out)
    assert np.array_equal(out, symbols)


def test_rans_costs_the_code_length_plus_its_lane_states():
    rng = np.random.default_rng(0)
    symbols = (rng.random(200_000) < 0.03).astype(np.uint8)  # 97% zeros
    freqs = _table(symbols, 2)
    stream = rans.encode(symbols, freqs)
    bits = float((np.bincount(symbols) * np.log2(65536 / freqs)).sum())
    assert len(stream) <= dzans.stream_bound(bits, symbols.size)
    assert len(stream) <= bits / 8 * 1.001 + 8 * rans.lane_count(symbols.size) + 4


@pytest.mark.parametrize("coder", ["numpy", pytest.param("c", marks=needs_c)])
def test_damaged_rans_streams_are_refused(coder, monkeypatch):
    if coder == "numpy":
        monkeypatch.setattr(rans, "lib", None)
    rng = np.random.default_rng(1)
    symbols = np.minimum(rng.geometric(0.4, 70_000) - 1, 9).astype(np.uint8)
    freqs = _table(symbols, 10)
    stream = rans.encode(symbols, freqs)
    for bad in (stream[:-4], stream + b"\0\0\0\0", stream[:-1], b""):
        with pytest.raises(TvqError, match="damaged"):
            rans.decode(bad, freqs, symbols.size)
    with pytest.raises(TvqError, match="damaged"):
        rans.decode(stream, freqs, symbols.size - 1)  # not the stream of that many symbols
    for pos in (3, 9, len(stream) // 2):  # a flipped state or word: refused or other symbols
        flipped = bytearray(stream)
        flipped[pos] ^= 0x40
        try:
            decoded = rans.decode(bytes(flipped), freqs, symbols.size)
        except TvqError:
            continue
        assert not np.array_equal(decoded, symbols)
    with pytest.raises(TvqError, match="malformed"):
        rans.decode(stream, np.array([65535]), 3)


# --- dzans records ---------------------------------------------------------------------------
def _tensor(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (rows, cols)
    if kind == "zero":
        return np.zeros(shape, np.float32)
    if kind == "ties":  # every value on a bin edge of the coarse steps: (0.5 + m) * 2^-3
        return (
            (rng.integers(-6, 7, shape) + 0.5 * np.sign(rng.standard_normal(shape))) / 8
        ).astype(np.float32)
    if kind == "rows":  # most rows untouched (embeddings of unseen tokens)
        x = rng.standard_normal(shape).astype(np.float32) * 1e-3
        x[rng.random(rows) < 0.8] = 0
        return x
    if kind == "cauchy":  # tails long enough for escapes
        return (rng.standard_cauchy(shape) * 1e-2).astype(np.float32)
    return (rng.laplace(size=shape) * 1e-3).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["zero", "ties", "rows", "cauchy", "laplace"]),
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    pick=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_records_round_trip_within_their_bounds(kind, rows, cols, pick, seed):
    """Every setting the allocator measures: the record decodes to exactly the values the
    encoder reports, its size is within the measured bound and the format's bound, the error
    is as measured, and the record's length is self-evident from its bytes."""
    x = _tensor(kind, rows, cols, seed)
    measured = dzans.measure(x, rows)
    m = measured[int(pick * (len(measured) - 1))]
    coded = dzans.encode(x, rows, m.setting, want_values=True)
    info = dzans.parse(coded.record + b"tail", 0, rows)
    assert info.end == len(coded.record)
    values = dzans.decode(info, rows, cols)
    assert np.array_equal(values, coded.values)
    assert len(coded.record) <= m.nbytes <= dzans.record_bound(x.size, rows)
    error = float(np.square(values.astype(np.float64) - x.reshape(-1)).sum())
    assert error == pytest.approx(coded.sq_error, rel=1e-6, abs=1e-30)
    assert error == pytest.approx(m.final_error, rel=1e-3, abs=1e-30)
    assert np.all(np.sign(values) * np.sign(x.reshape(-1)) >= 0)  # never the wrong sign
    if kind == "zero" or m.setting.j is None:
        assert coded.record == b"\0" and not values.any()


def test_a_fine_step_keeps_every_entry_and_a_coarse_one_none():
    x = _tensor("laplace", 30, 20, 3)
    fine = dzans.encode(x, 30, dzans.Setting(-60), want_values=True)  # step 2^-15
    assert np.array_equal(fine.values != 0, np.abs(x.reshape(-1)) >= 0.5 * 2**-15)
    assert np.abs(fine.values - x.reshape(-1)).max() <= 2**-15
    coarse = dzans.encode(x, 30, dzans.Setting(40), want_values=True)
    assert coarse.record == b"\0"


def test_gain_restores_the_norm_and_offsets_sit_inside_their_bins():
    x = _tensor("laplace", 64, 64, 4)
    setting = dzans.Setting(round(4 * np.log2(np.abs(x).max())) - 2)  # ~95% zeros
    coded = dzans.encode(x, 64, setting, want_values=True)
    info = dzans.parse(coded.record, 0, 64)
    assert info.cg > 0
    norm, kept = np.linalg.norm(x), np.linalg.norm(coded.values)
    assert abs(kept / norm - 1) < 0.01
    plain = dzans.levels(np.array([1, 2]), setting, info.c1, info.c2, 0) / setting.step
    assert 0.5 <= plain[0] < 1.5 and 1.5 <= plain[1] < 2.5


@pytest.mark.parametrize("kind", ["laplace", "rows", "cauchy"])
def test_damaged_records_raise_never_crash(kind):
    """Record-level checks behind the stored tensor's crc32: a cut, a byte too many, or bits
    flipped anywhere give TvqError or, where the bytes still form a record, other numbers;
    never another exception."""
    rows, cols = 50, 30
    x = _tensor(kind, rows, cols, 5)
    m = dzans.measure(x, rows)[20]
    record = dzans.encode(x, rows, m.setting).record
    assert len(record) > 10
    for cut in range(len(record)):
        with pytest.raises(TvqError):
            info = dzans.parse(record[:cut], 0, rows)
            dzans.decode(info, rows, cols)
    rng = np.random.default_rng(0)
    for _ in range(300):
        bad = bytearray(record)
        for pos in rng.integers(0, len(record), rng.integers(1, 4)):
            bad[pos] ^= 1 << rng.integers(0, 8)
        try:
            info = dzans.parse(bytes(bad), 0, rows)
            values = dzans.decode(info, rows, cols)
        except TvqError:
            continue
        assert values.shape == (rows * cols,) and np.isfinite(values).all()


def test_record_of_an_empty_tensor_is_one_byte():
    empty = np.zeros((0, 7), np.float32)
    assert dzans.encode(empty, 0, dzans.Setting(-10)).record == b"\0"
    assert [m.setting for m in dzans.measure(empty, 0)] == [dzans.ZERO]


# --- the archive format -------------------------------------------------------------------------
def test_mixed_parts_read_back_framed_and_on_their_own(tmp_path):
    """One archive mixing dense and low-rate parts: records of small entries in their roles'
    frames (a 1-D entry's too), a record of a 2^20-element entry on its own, next to dense
    `zstd-c` codes; every value reads back as encoded, and damage in a record of its own is
    caught by its checksum."""
    rng = np.random.default_rng(0)
    shapes = {"small.weight": (16, 24), "vec": (24,), "big.weight": (1024, 1024)}
    x = {n: (rng.laplace(size=s) * 1e-3).astype(np.float32) for n, s in shapes.items()}
    low = dzans.Setting(-40)
    parts = {
        "small.weight": [Part("task:a", 4, 8), Part.low_rate("task:b", low)],
        "vec": [Part.low_rate("task:a", low), Part.low_rate("task:b", dzans.Setting(-44, 8))],
        "big.weight": [Part.low_rate("task:a", low), Part("task:b", 3, 128, codec="zstd-c")],
    }
    entries = [TensorEntry(n, s, "F32", "quantized", parts[n]) for n, s in shapes.items()]
    header = ArchiveHeader("tvq", ["a", "b"], "test", "sha256:" + "0" * 64, entries)
    header.frames = {"task:a": 1, "task:b": 1}
    out, expected = tmp_path / "mixed.tvq", {}
    frames = Frames(header)
    with ArchiveWriter(out, header) as writer:
        for entry in entries:
            value = torch.from_numpy(x[entry.name])
            for part in entry.parts:
                if part.dense:
                    q = quantize(value, part.spec)
                    coded, expected[part.role, entry.name] = (
                        q,
                        dequantize(q, part.spec, entry.shape),
                    )
                else:
                    coded = dzans.encode(x[entry.name], entry.rows, part.setting, want_values=True)
                    expected[part.role, entry.name] = torch.from_numpy(coded.values)
                for key, data in frames.split(coded_outputs(part, entry, coded)):
                    writer.write(key, data)
        for key, data in frames.stored():
            writer.write(key, data)
    archive = open_archive(out)
    stored = {s.key for s in archive.stored}
    assert {"frame:task:a", "frame:task:b", "task:a:big.weight:dzans"} <= stored
    assert archive.verify() == sum(s.nbytes for s in archive.stored)
    for (role, name), value in expected.items():
        got = archive.task_vector(role.split(":")[1], name)
        assert torch.equal(got.reshape(-1), value.reshape(-1)), (role, name)
    _, start, end = archive._offsets["task:a:big.weight:dzans"]
    data = bytearray(out.read_bytes())
    data[(start + end) // 2] ^= 0x04
    (tmp_path / "bad.tvq").write_bytes(bytes(data))
    with pytest.raises(TvqError, match="checksum mismatch in task:a:big.weight:dzans"):
        open_archive(tmp_path / "bad.tvq").task_vector("a", "big.weight")
