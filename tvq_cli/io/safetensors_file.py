"""The safetensors container, as both checkpoints and archives use it.

A safetensors file is an 8-byte little-endian header length, a JSON header (padded with spaces
to a multiple of 8 bytes) mapping tensor keys to dtype, shape and byte offsets (relative to the
payload), then the raw tensor bytes back to back. Tensors are read with `pread` into buffers of
their own rather than through a memory map: touched pages of a map count towards the process's
resident memory until it is closed, a file truncated under a map kills the process with SIGBUS
where a short read is a clean error, and a plain read releases the GIL.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from ..errors import InternalError, TvqError

MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA = "__metadata__"


def encode_header(
    tensors: Iterable[tuple[str, str, Sequence[int], int]],
    metadata: dict[str, str],
    reserve: int = 0,
) -> bytes:
    """Header bytes (length prefix included) for tensors `(key, dtype, shape, nbytes)` stored
    back to back in this order. `reserve`: pad the header with spaces to exactly this many
    bytes (a writer that patches the header in place once sizes are known)."""
    doc: dict[str, object] = {METADATA: metadata}
    offset = 0
    for key, dtype, shape, nbytes in tensors:
        doc[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    if reserve:
        if 8 + len(raw) > reserve:
            raise InternalError("safetensors header outgrew its reserved space")
        raw += b" " * (reserve - 8 - len(raw))
    return struct.pack("<Q", len(raw)) + raw


def parse_header(prefix: bytes, file_size: int) -> tuple[dict, int, int]:
    """(JSON document, header length, payload start) from the first bytes of a file."""
    if file_size < 8 or len(prefix) < 8:
        raise TvqError("file is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise TvqError("header length is out of range (truncated, or not a safetensors file)")
    if len(prefix) < 8 + length:
        raise TvqError("file is truncated inside its header")
    try:
        doc = json.loads(prefix[8 : 8 + length])
    except (ValueError, RecursionError):
        raise TvqError("header is not valid JSON (not a safetensors file)") from None
    if not isinstance(doc, dict):
        raise TvqError("header is not a JSON object (not a safetensors file)")
    return doc, length, 8 + length


def read_prefix(file: BinaryIO, size: int) -> bytes:
    """The length and JSON header at the start of a file of `size` bytes (for `parse_header`,
    which checks them), and no more: reading up to the largest header allowed instead copied
    100 MiB of tensor data into a fresh buffer for every file opened (1.5 GB for pack's 15
    shards in the 1B benchmark)."""
    prefix = _read_up_to(file, min(size, 8))
    if len(prefix) == 8:
        (length,) = struct.unpack("<Q", prefix)
        if length <= MAX_HEADER_BYTES:
            prefix += _read_up_to(file, min(length, size - 8))
    return prefix


def _read_up_to(file: BinaryIO, size: int) -> bytes:
    """The next `size` bytes (fewer only if the file shrank meanwhile: the checks catch it)."""
    chunks, done = [], 0
    while done < size:
        chunk = file.read(size - done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def read_header(path: Path) -> tuple[dict, int]:
    """(JSON document, payload start) of a safetensors file on disk."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = read_prefix(f, size)
    except OSError as exc:
        raise TvqError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        doc, _, start = parse_header(prefix, size)
    except TvqError as exc:
        raise TvqError(f"{path}: {exc}") from None
    return doc, start


def data_places(doc: dict, start: int) -> dict[str, tuple[int, int]]:
    """Absolute byte offset and size of every tensor of a parsed header."""
    places = {}
    for name, info in doc.items():
        if name == METADATA:
            continue
        first, end = (int(v) for v in info["data_offsets"])
        places[name] = (start + first, end - first)
    return places


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` with the file's bytes from `offset`; EOFError if the file ends first."""
    done = 0
    while done < view.nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError
        done += got
