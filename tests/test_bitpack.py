"""Bit-packing: the documented bit layout, exact round trips, and the chunked code paths."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvq_cli.errors import TvqError
from tvq_cli.quant.bitpack import _CHUNK, pack_bits, unpack_bits
from tvq_cli.quant.sizes import packed_nbytes


def reference_pack(codes: np.ndarray, bits: int) -> bytes:
    """Bit-by-bit reading of the layout in the module docstring (slow, obviously right)."""
    out = bytearray(packed_nbytes(codes.size, bits))
    for i, code in enumerate(codes.tolist()):
        for b in range(bits):
            if code >> b & 1:
                k = i * bits + b
                out[k // 8] |= 1 << (k % 8)
    return bytes(out)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_matches_documented_layout_and_round_trips(bits: int, data) -> None:
    count = data.draw(st.integers(0, 300))
    codes = np.array(
        data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=count, max_size=count)),
        dtype=np.uint8,
    )
    packed = pack_bits(codes, bits)
    assert packed.tobytes() == reference_pack(codes, bits)
    assert np.array_equal(unpack_bits(packed, bits, count), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_across_work_blocks(bits: int) -> None:
    """Counts that span several work blocks and end in a partial block."""
    rng = np.random.default_rng(bits)
    count = 2 * _CHUNK + 13
    codes = rng.integers(0, 1 << bits, count).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.size == packed_nbytes(count, bits)
    assert packed[: 64 * bits].tobytes() == reference_pack(codes[:512], bits)[: 64 * bits]
    assert np.array_equal(unpack_bits(packed, bits, count), codes)


def test_unpack_rejects_wrong_length() -> None:
    with pytest.raises(TvqError, match="expected 2"):
        unpack_bits(np.zeros(3, np.uint8), 4, 4)


def test_bits_out_of_range() -> None:
    with pytest.raises(TvqError):
        pack_bits(np.zeros(4, np.uint8), 9)
