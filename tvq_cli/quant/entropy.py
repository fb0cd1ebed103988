"""Entropy stage of dense codes: lossless zstd compression of one part's codes, one frame per
stored tensor, so any one tensor still decodes without reading the others.

Task-vector codes cluster around each group's zero-point. Codec `zstd-c` (the default) stores
each code centered on it, `(code - zero) mod 2^bits`, so every group's most frequent code is the
same byte value, and compresses with zstd's literal (Huffman) coder alone: no match search,
which found little on such codes and cost most of the time. Measured against `zstd` (format 2:
codes as they are, level 3): 1-5% smaller on continuous task vectors' codes and 19-21% on bf16
fine-tunes', whose codes it encodes 2-2.4x faster; decoding, which adds the zero-points back
in numpy, is 10-20% slower (docs/performance.md, "Entropy stage"). Codes are
laid out byte-aligned first (3-bit codes as nibbles, 5-7-bit codes as whole bytes; 1, 2, 4, 8
bits as packed), and each frame carries its content checksum.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import zstandard

from ..errors import InternalError, TvqError
from . import native
from .bitpack import pack_bits, unpack_bits
from .sizes import SYMBOL_BITS, symbol_nbytes

LEVEL = 3  # zstd: format 2's codes, and the small files
# zstd's fast strategy with a target length of 0 keeps literal (Huffman) compression on; the
# tiny hash and chain tables make its match search all but free (python-zstandard cannot force
# literals-only mode). Fixed here: a frame's bytes depend on them, and archives are pinned.
CENTERED_PARAMS = dict(
    strategy=zstandard.STRATEGY_FAST,
    target_length=0,
    min_match=7,
    hash_log=6,
    chain_log=6,
    search_log=1,
    window_log=20,
    write_checksum=True,
)


def encode(codes: np.ndarray, bits: int, codec: str) -> bytes:
    """One zstd frame holding `codes` (uint8, each < 2**bits; for `zstd-c` already centered)."""
    return compress(pack_bits(codes, SYMBOL_BITS[bits]), codec)


def compress(data: np.ndarray | bytes, codec: str = "zstd") -> bytes:
    """One zstd frame (content checksum on) of `data`: codes already laid out byte-aligned
    (`SYMBOL_BITS` per code) with `codec`'s parameters, or a stored file ("zstd")."""
    return _compressor(codec).compress(data)


def _compressor(codec: str) -> zstandard.ZstdCompressor:
    """This thread's compressor for `codec` (one may not be used by two threads at once):
    made once, since setting up its context cost about 5% of compressing a tensor's codes.
    A compressor starts every frame afresh, so its frames are the same bytes."""
    compressors = getattr(_local, "compressors", None)
    if compressors is None:
        compressors = _local.compressors = {}
    if codec not in compressors:
        if codec == "zstd-c":
            params = zstandard.ZstdCompressionParameters(**CENTERED_PARAMS)
            compressors[codec] = zstandard.ZstdCompressor(compression_params=params)
        else:
            compressors[codec] = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True)
    return compressors[codec]


def center(
    codes: np.ndarray, zeros: np.ndarray, shape: tuple[int, ...], group_size: int, bits: int
) -> np.ndarray:
    """`zstd-c`'s stored codes, `(code - zero) mod 2^bits` with each element's group
    zero-point. Groups as in docs/format.md: per row of `shape`'s last dimension, `group_size`
    (0: one per tensor)."""
    return _shift(np.subtract, codes, zeros, shape, group_size, bits)


def uncenter(
    codes: np.ndarray, zeros: np.ndarray, shape: tuple[int, ...], group_size: int, bits: int
) -> np.ndarray:
    """The codes back from `center`'s, `(stored + zero) mod 2^bits`, in place in `codes` (a
    decode's own buffer): merge decodes every tensor of every task, and a new array per tensor
    costs more in page faults than the addition. One native pass where the groups tile the
    tensor (a group longer than a row is the row)."""
    codes = codes.reshape(-1)
    per_tensor = group_size == 0 or not shape
    width = codes.size if per_tensor else min(group_size, shape[-1])
    if native.lib is not None and codes.size and (per_tensor or shape[-1] % width == 0):
        native.lib.uncenter(codes, width, zeros, bits)
        return codes
    codes[:] = _shift(np.add, codes, zeros, shape, group_size, bits)
    return codes


def _shift(op, codes, zeros, shape, group_size, bits) -> np.ndarray:
    """`op(code, zero) mod 2^bits` per group, as a new array. uint8 arithmetic wraps modulo
    256, so masking the low bits gives the modulus."""
    mask = np.uint8((1 << bits) - 1)
    codes = codes.reshape(-1)
    if group_size == 0 or len(shape) == 0 or codes.size == 0:
        return op(codes, zeros[:1], dtype=np.uint8) & mask
    cols = shape[-1]
    size = min(group_size, cols)
    full, tail = divmod(cols, size)
    rows = codes.size // cols
    grid = codes.reshape(rows, cols)
    per_row = zeros.reshape(rows, full + (1 if tail else 0))
    head = grid[:, : full * size].reshape(rows, full, size)
    out = op(head, per_row[:, :full, None], dtype=np.uint8).reshape(rows, full * size)
    if tail:
        rest = op(grid[:, full * size :], per_row[:, full:], dtype=np.uint8)
        out = np.concatenate([out, rest], axis=1)
    out &= mask
    return out.reshape(-1)


def decompress(
    frame: np.ndarray | bytes, expected: int, out: np.ndarray | None = None
) -> bytes | np.ndarray:
    """Inverse of `compress`: its `expected` bytes, or `out[:expected]` holding them (a
    reused buffer) where given; a damaged frame or one of another size raises TvqError."""
    try:
        if out is None:
            data = zstandard.ZstdDecompressor().decompress(
                bytes(frame), max_output_size=max(expected, 1)
            )
            got = len(data)
        else:
            data = out[:expected]
            got = _decompress_into(frame, data)
    except zstandard.ZstdError as exc:
        raise TvqError(f"zstd frame is damaged ({exc})") from None
    if got != expected:
        raise TvqError(f"zstd frame decodes to {got} bytes, expected {expected} (damaged)")
    return data


def decode(
    frame: np.ndarray | bytes, bits: int, count: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Inverse of `encode`; a damaged or foreign frame raises TvqError, never wrong codes.

    With `out` (a reused buffer, as `unpack_bits` takes), the frame is also decompressed into
    a reused buffer of this thread: merge decodes every tensor of every task in every pass,
    and fresh multi-megabyte arrays cost more in page faults than the decompression itself.
    """
    expected = symbol_nbytes(count, bits)
    try:
        data = decompress(frame, expected, None if out is None else _scratch(expected))
    except TvqError as exc:
        raise TvqError(f"entropy-coded codes: {exc}") from None
    symbols = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    return _in_range(unpack_bits(symbols, SYMBOL_BITS[bits], count, out), bits)


def _in_range(codes: np.ndarray, bits: int) -> np.ndarray:
    """`codes`, checked: unpacked from SYMBOL_BITS-wide symbols, each must be < 2**bits."""
    if bits < SYMBOL_BITS[bits] and (codes >> bits).any():
        raise TvqError("entropy-coded codes hold out-of-range values (damaged)")
    return codes


_local = threading.local()


def _scratch(size: int) -> np.ndarray:
    """This thread's reused buffer of `size` bytes."""
    buffer = getattr(_local, "symbols", None)
    if buffer is None or buffer.size < size:
        buffer = _local.symbols = np.empty(size, np.uint8)
    return buffer[:size]


def _decompress_into(frame: np.ndarray | bytes, out: np.ndarray) -> int:
    """Decompress one frame into `out`; returns its decoded size (more than `out` holds:
    len(out) + 1). A stream reader stops quietly where its input ends, so the frame's extent
    is checked first: then its checksum is checked when its end is read."""
    if _frame_size(memoryview(frame).cast("B")) != len(frame):
        raise zstandard.ZstdError("the frame is truncated or followed by other data")
    view = memoryview(out)
    got = 0
    with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
        while got < len(view):
            step = reader.readinto(view[got:])
            if not step:
                break
            got += step
        if reader.read(1):
            got += 1
    return got


def _frame_size(frame: memoryview) -> int:
    """The size of the zstd frame at the start of `frame`; -1 where its headers run past its
    end."""
    extent = FrameExtent()
    extent.feed(frame)
    return extent.size()


_MAX_FRAME_HEADER = 18  # magic, descriptor, window, dictionary id, content size


class FrameExtent:
    """Where a zstd frame ends, from its header and block headers (the format's own framing;
    RFC 8878, section 3.1.1), read as the frame's bytes pass by in pieces, in order. A zstd
    stream reader stops quietly where its input ends, so a frame cut short could pass
    unnoticed: its extent equal to its stored size is what says its checksum was read."""

    def __init__(self) -> None:
        self._head = b""  # the first bytes, until the frame header is read
        self._at = -1  # where the next block header starts; -1: frame header not read
        self._checksum = 0
        self._carry = b""  # the start of a block header cut by the end of a piece
        self.seen = 0  # bytes fed so far
        self._end = -1  # the frame's end once its last block header is seen
        self._broken = False

    def feed(self, piece: memoryview | bytes | np.ndarray) -> None:
        view = memoryview(piece).cast("B")
        if self._at < 0 and not self._broken:
            take = _MAX_FRAME_HEADER - len(self._head)
            self._head += bytes(view[:take])
            self.seen += min(take, len(view))
            view = view[take:]
            if len(self._head) < _MAX_FRAME_HEADER:
                return
            self._read_header()
        base = self.seen
        self.seen += len(view)
        self._walk(view, base)

    def size(self) -> int:
        """The frame's size; -1 where its headers run past the bytes fed, or are damaged."""
        if self._at < 0 and not self._broken:
            self._read_header()
        return self._end

    def _read_header(self) -> None:
        try:
            self._at = zstandard.frame_header_size(self._head)
            self._checksum = zstandard.get_frame_parameters(self._head).has_checksum
        except zstandard.ZstdError:
            self._broken = True
            return
        self._walk(memoryview(self._head), 0)

    def _walk(self, view: memoryview, base: int) -> None:
        """Step over the block headers that start in `view` (bytes [base, base + len))."""
        while self._end < 0 and not self._broken:
            if self._carry:
                need = 3 - len(self._carry)
                if len(view) < need:
                    self._carry += bytes(view)
                    return
                header_bytes, self._carry = self._carry + bytes(view[:need]), b""
            else:
                offset = self._at - base
                if offset + 3 > len(view):
                    self._carry = bytes(view[offset:]) if offset < len(view) else b""
                    return
                header_bytes = view[offset : offset + 3]
            header = header_bytes[0] | header_bytes[1] << 8 | header_bytes[2] << 16
            kind, size = (header >> 1) & 3, header >> 3
            self._at += 3 + (1 if kind == 1 else size)  # RLE blocks store one byte
            if header & 1:  # the last block
                self._end = self._at + 4 * self._checksum


PIECE = 1 << 18  # bytes of a stored frame read at a time by `FrameDecoder`


class FrameDecoder:
    """`decode` of one frame a block of codes at a time, in order, with the frame's bytes read
    in pieces (`read(n)`: its next n stored bytes): merge's large tensors, whose codes of
    every task would not fit in memory at once. The same checks as `decode`: every block's
    codes in range, and at `close` that the frame decoded to exactly its codes and ended where
    its stored bytes do (zstd checks its content checksum there)."""

    def __init__(
        self, read: Callable[[int], np.ndarray], stored: int, bits: int, count: int, where: str
    ):
        self.bits, self.where = bits, where
        self._symbols = symbol_nbytes(count, bits)
        self._source = _FrameBytes(read, stored)  # not self: no reference cycle (merges run
        # with the garbage collector paused, and a cycle would keep zstd's buffers alive)
        self._reader = zstandard.ZstdDecompressor().stream_reader(self._source, read_size=PIECE)

    def next(self, count: int, out: np.ndarray) -> np.ndarray:
        """The frame's next `count` codes (whole bytes of the layout), unpacked into `out`."""
        symbol_bits = SYMBOL_BITS[self.bits]
        if count * symbol_bits % 8:
            raise InternalError(f"a block of {count} codes ends inside a byte")
        nbytes = count * symbol_bits // 8
        data = _scratch(nbytes)
        view, got = memoryview(data), 0
        try:
            while got < nbytes:
                step = self._reader.readinto(view[got:])
                if not step:
                    break
                got += step
        except zstandard.ZstdError as exc:
            raise self._damaged(f"zstd frame is damaged ({exc})") from None
        self._symbols -= got
        if got < nbytes:
            raise self._damaged("zstd frame ends early (damaged)")
        try:
            return _in_range(unpack_bits(data, symbol_bits, count, out), self.bits)
        except TvqError as exc:
            raise TvqError(f"{self.where}: {exc}") from None

    def _damaged(self, what: str) -> TvqError:
        return TvqError(f"{self.where}: entropy-coded codes: {what}")

    def close(self) -> None:
        """Every code was read: the frame must end here, and exactly where its bytes do."""
        if self._symbols:
            raise InternalError("a frame was closed before all of its codes were read")
        try:
            more = self._reader.read(1)
        except zstandard.ZstdError as exc:
            raise self._damaged(f"zstd frame is damaged ({exc})") from None
        finally:
            self._reader.close()
        source = self._source
        while source.left:  # the rest of the stored bytes (their checksum is read at the end)
            source.read(PIECE)
        if more or source.extent.size() != source.extent.seen:
            raise self._damaged(
                "zstd frame is truncated, longer than its codes, or followed by other data "
                "(damaged)"
            )


class _FrameBytes:
    """A frame's stored bytes for zstd's stream reader (`read`; b"" at their end), its extent
    followed as they pass."""

    def __init__(self, read: Callable[[int], np.ndarray], stored: int):
        self._read, self.left = read, stored
        self.extent = FrameExtent()

    def read(self, size: int) -> np.ndarray | bytes:
        size = min(size, self.left)
        if size <= 0:
            return b""
        data = self._read(size)
        self.left -= size
        self.extent.feed(data)
        return data
