"""Byte counts of the stored codes: what an archive's layout is derived from.

Pure arithmetic, apart from numpy and zstandard, so that reading an archive's header (`tvq
inspect`, `tvq --help`) imports neither; `bitpack` and `entropy` do the packing and coding.
"""

from __future__ import annotations

CODECS = ("raw", "zstd", "zstd-c")  # dense codecs; "zstd" is format 2's, kept readable
CODED = ("zstd", "zstd-c")  # the entropy-coded ones (a stored frame of measured size)
DEFAULT_CODEC = "zstd-c"
SYMBOL_BITS = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}  # zstd's byte-aligned input


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for `count` codes of `bits` bits."""
    return (count * bits + 7) // 8


def symbol_nbytes(count: int, bits: int) -> int:
    """Bytes of the byte-aligned layout that is fed to zstd."""
    return packed_nbytes(count, SYMBOL_BITS[bits])


def compress_bound(count: int, bits: int) -> int:
    """zstd's worst-case frame size (ZSTD_COMPRESSBOUND) plus its 4-byte checksum and header."""
    size = symbol_nbytes(count, bits)
    slack = (128 * 1024 - size) >> 11 if size < 128 * 1024 else 0
    return size + (size >> 8) + slack + 32
