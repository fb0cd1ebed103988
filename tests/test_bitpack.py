import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvq_cli.errors import TvqError
from tvq_cli.quant.bitpack import pack_bits, packed_nbytes, unpack_bits


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip_any_width_and_length(bits, data):
    count = data.draw(st.integers(0, 300))
    codes = np.array(
        data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=count, max_size=count)),
        dtype=np.uint8,
    )
    stream = pack_bits(codes, bits)
    assert stream.dtype == np.uint8
    assert stream.size == packed_nbytes(count, bits) == (count * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(stream, bits, count), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_is_little_endian_bit_stream(bits):
    """Code i occupies stream bits [i*b, i*b+b), LSB first: the layout docs/format.md specifies."""
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=37, dtype=np.uint8)
    stream_bits = np.unpackbits(pack_bits(codes, bits), bitorder="little")[: 37 * bits]
    weights = 1 << np.arange(bits)
    np.testing.assert_array_equal((stream_bits.reshape(37, bits) * weights).sum(axis=1), codes)


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_large_arrays_straddling_bytes(bits):
    codes = np.random.default_rng(0).integers(0, 2**bits, size=100_003, dtype=np.uint8)
    np.testing.assert_array_equal(unpack_bits(pack_bits(codes, bits), bits, codes.size), codes)


def test_wrong_stream_length_is_an_error():
    with pytest.raises(TvqError, match="expected"):
        unpack_bits(np.zeros(3, np.uint8), 3, 9)


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(TvqError, match="between 1 and 8"):
        pack_bits(np.zeros(4, np.uint8), bits)
