"""The safetensors container around the archive: header bytes in, header bytes out.

A safetensors file is an 8-byte little-endian header length, a JSON header (padded with spaces
to a multiple of 8 bytes) mapping tensor keys to dtype, shape and byte offsets, then the raw
tensor bytes. tvq's own header rides in `__metadata__` as JSON strings, so any safetensors
reader opens an archive, and one stored tensor can be read without reading the others.
"""

from __future__ import annotations

import json
import re
import zlib

from ..errors import TvqError
from ..io.safetensors_file import METADATA, parse_header
from ..io.safetensors_file import encode_header as encode_safetensors_header
from .format import CHECKSUMS_KEY, METADATA_KEY, ArchiveHeader, StoredTensor

HEADER_CHECKSUM = "__header__"
CRC_PLACEHOLDER = 0
HEX32 = re.compile(r"[0-9a-f]{8}")


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def encode_header(
    header: ArchiveHeader,
    stored: list[StoredTensor],
    checksums: dict[str, int],
    reserve: int = 0,
) -> bytes:
    """The container header bytes (length prefix included) for a complete archive.

    Checksums are fixed-width hex, so the header has the same length before and after the
    payload's checksums are known: the writer reserves it, then patches it in place. With
    entropy-coded parts the final sizes are only known at the end; the writer reserves the
    length of the header with every coded size at its bound and pads the final one to
    `reserve` bytes with spaces (the padding safetensors allows).
    """
    meta = header.to_json()
    sums = {HEADER_CHECKSUM: f"{crc32(meta.encode()):08x}"}
    sums.update({s.key: f"{checksums.get(s.key, CRC_PLACEHOLDER):08x}" for s in stored})
    metadata = {METADATA_KEY: meta, CHECKSUMS_KEY: json.dumps(sums, separators=(",", ":"))}
    tensors = ((s.key, s.dtype, s.shape, s.nbytes) for s in stored)
    return encode_safetensors_header(tensors, metadata, reserve)


def _hex32(text: str) -> int:
    """A checksum as the writer spells it (8 lowercase hex digits), so that no damaged spelling
    of the same number (a flipped case bit) passes as intact."""
    if not isinstance(text, str) or not HEX32.fullmatch(text):
        raise ValueError("malformed checksum")
    return int(text, 16)


def decode_header(prefix: bytes, file_size: int) -> tuple[dict, ArchiveHeader, dict[str, int], int]:
    """Parse and check the container header; returns (entries, header, checksums, data start)."""
    doc, length, start = parse_header(prefix, file_size)
    if length % 8:
        raise TvqError("header length is out of range (truncated or not a tvq archive)")
    try:
        metadata = doc.pop(METADATA)
        meta_text = metadata[METADATA_KEY]
        sums = json.loads(metadata[CHECKSUMS_KEY])
        checksums = {str(k): _hex32(v) for k, v in sums.items()}
        meta_bytes = meta_text.encode()
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise TvqError("not a tvq archive (no tvq metadata in the safetensors header)") from None
    if not isinstance(meta_text, str):
        raise TvqError("archive header is malformed")
    if checksums.get(HEADER_CHECKSUM) != crc32(meta_bytes):
        raise TvqError("archive header checksum mismatch (the file is damaged)")
    header = ArchiveHeader.from_json(meta_text)
    return doc, header, checksums, start
