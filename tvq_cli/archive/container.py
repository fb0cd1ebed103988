"""The safetensors container around the archive: header bytes in, header bytes out.

A safetensors file is an 8-byte little-endian header length, a JSON header (padded with spaces
to a multiple of 8 bytes) mapping tensor keys to dtype, shape and byte offsets, then the raw
tensor bytes. tvq's own header rides in `__metadata__` as JSON strings, so any safetensors
reader opens an archive, and one stored tensor can be read without reading the others.
"""

from __future__ import annotations

import json
import re
import struct
import zlib

from ..errors import TvqError
from .format import CHECKSUMS_KEY, METADATA_KEY, ArchiveHeader, StoredTensor

HEADER_CHECKSUM = "__header__"
MAX_HEADER_BYTES = 100 * 1024 * 1024
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
    doc: dict[str, object] = {
        "__metadata__": {METADATA_KEY: meta, CHECKSUMS_KEY: json.dumps(sums, separators=(",", ":"))}
    }
    offset = 0
    for s in stored:
        doc[s.key] = {
            "dtype": s.dtype,
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    if reserve:
        if 8 + len(raw) > reserve:
            raise TvqError("internal error: archive header outgrew its reserved space")
        raw += b" " * (reserve - 8 - len(raw))
    return struct.pack("<Q", len(raw)) + raw


def _hex32(text: str) -> int:
    """A checksum as the writer spells it (8 lowercase hex digits), so that no damaged spelling
    of the same number (a flipped case bit) passes as intact."""
    if not isinstance(text, str) or not HEX32.fullmatch(text):
        raise ValueError("malformed checksum")
    return int(text, 16)


def decode_header(prefix: bytes, file_size: int) -> tuple[dict, ArchiveHeader, dict[str, int], int]:
    """Parse and check the container header; returns (entries, header, checksums, data start)."""
    if file_size < 8 or len(prefix) < 8:
        raise TvqError("file is too short to be a safetensors archive")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size or length % 8:
        raise TvqError("header length is out of range (truncated or not a tvq archive)")
    if len(prefix) < 8 + length:
        raise TvqError("file is truncated inside its header")
    try:
        doc = json.loads(prefix[8 : 8 + length])
        metadata = doc.pop("__metadata__")
        meta_text = metadata[METADATA_KEY]
        sums = json.loads(metadata[CHECKSUMS_KEY])
        checksums = {str(k): _hex32(v) for k, v in sums.items()}
        meta_bytes = meta_text.encode()
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise TvqError("not a tvq archive (no tvq metadata in the safetensors header)") from None
    if not isinstance(doc, dict) or not isinstance(meta_text, str):
        raise TvqError("archive header is malformed")
    if checksums.get(HEADER_CHECKSUM) != crc32(meta_bytes):
        raise TvqError("archive header checksum mismatch (the file is damaged)")
    header = ArchiveHeader.from_json(meta_text)
    return doc, header, checksums, 8 + length
