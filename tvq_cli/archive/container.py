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
SHARD_KEY = "tvq.shard"  # a shard's place in its sharded archive (docs/format.md)
INDEX_FORMAT = "tvq-archive-index"
INDEX_SUFFIX = ".tvq.index.json"


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
    own = {HEADER_CHECKSUM: crc32(meta.encode())}
    return _encode(stored, {**own, **checksums}, {METADATA_KEY: meta}, reserve, HEADER_CHECKSUM)


def _encode(
    stored: list[StoredTensor],
    checksums: dict[str, int],
    metadata: dict[str, str],
    reserve: int,
    *first: str,
) -> bytes:
    """A container header: `metadata`, then the checksums of `first` keys and of every stored
    tensor (fixed-width hex, a placeholder where not known yet)."""
    keys = [*first, *(s.key for s in stored)]
    sums = {key: f"{checksums.get(key, CRC_PLACEHOLDER):08x}" for key in keys}
    metadata = {**metadata, CHECKSUMS_KEY: json.dumps(sums, separators=(",", ":"))}
    tensors = ((s.key, s.dtype, s.shape, s.nbytes) for s in stored)
    return encode_safetensors_header(tensors, metadata, reserve)


def encode_shard_header(
    stored: list[StoredTensor],
    checksums: dict[str, int],
    shard: int,
    count: int,
    header_crc: int,
    reserve: int = 0,
) -> bytes:
    """The container header of shard `shard` (1-based) of `count`: its own stored tensors,
    their checksums, and the crc32 of the archive header (in the index) it belongs to."""
    place = {"shard": shard, "of": count, "header_crc32": f"{header_crc:08x}"}
    return _encode(
        stored, checksums, {SHARD_KEY: json.dumps(place, separators=(",", ":"))}, reserve
    )


def encode_index(header: ArchiveHeader, weight_map: dict[str, str], max_shard_bytes: int) -> str:
    """The index of a sharded archive: the archive header and which shard holds each key."""
    meta = header.to_json()
    doc = {
        "metadata": {
            "format": INDEX_FORMAT,
            METADATA_KEY: meta,
            "header_crc32": f"{crc32(meta.encode()):08x}",
            "max_shard_size": max_shard_bytes,
        },
        "weight_map": weight_map,
    }
    return json.dumps(doc, indent=1) + "\n"


def decode_index(text: bytes) -> tuple[ArchiveHeader, int, dict[str, str], int]:
    """(header, its crc32, key -> shard file name, max shard size) from an index's bytes."""
    try:
        doc = json.loads(text)
        metadata = doc["metadata"]
        if metadata.get("format") != INDEX_FORMAT:
            raise TvqError("not a tvq archive index (format name missing)")
        meta_text = metadata[METADATA_KEY]
        header_crc = _hex32(metadata["header_crc32"])
        weight_map = doc["weight_map"]
        max_shard = int(metadata["max_shard_size"])
        if not isinstance(meta_text, str) or not isinstance(weight_map, dict):
            raise TypeError
    except TvqError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise TvqError("not a tvq archive index (malformed JSON)") from None
    if crc32(meta_text.encode()) != header_crc:
        raise TvqError("archive header checksum mismatch in the index (the file is damaged)")
    for name in weight_map.values():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise TvqError(f"the index names a shard outside its folder: {name!r}")
    return ArchiveHeader.from_json(meta_text), header_crc, weight_map, max_shard


def decode_shard_header(prefix: bytes, file_size: int) -> tuple[dict, dict, dict[str, int], int]:
    """Parse one shard's container header: (entries, its place, checksums, data start)."""
    doc, length, start = parse_header(prefix, file_size)
    if length % 8:
        raise TvqError("header length is out of range (truncated or not a tvq shard)")
    try:
        metadata = doc.pop(METADATA)
        place = json.loads(metadata[SHARD_KEY])
        sums = json.loads(metadata[CHECKSUMS_KEY])
        checksums = {str(k): _hex32(v) for k, v in sums.items()}
        place = {
            "shard": int(place["shard"]),
            "of": int(place["of"]),
            "header_crc32": _hex32(place["header_crc32"]),
        }
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise TvqError("not a tvq archive shard (no shard metadata)") from None
    return doc, place, checksums, start


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
