"""Streaming archive writer: header first, payload tensor by tensor, checksums patched last.

Writes to a hidden temporary file beside the target and renames it into place only when every
stored tensor has been written, so an error or an interrupt never leaves a partial archive.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import TvqError
from .container import crc32, encode_header
from .format import ArchiveHeader, bound_header, layout, part_keys


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def reserved_header_length(header: ArchiveHeader) -> int:
    """Bytes the writer reserves for the header: its length with coded sizes at their bound."""
    bound = bound_header(header)
    return len(encode_header(bound, layout(bound), {}))


def archive_size(header: ArchiveHeader) -> int:
    """Exact size in bytes of the archive `header` describes (used by --dry-run).

    For entropy-coded parts the header must carry their real coded sizes.
    """
    return reserved_header_length(header) + sum(s.nbytes for s in layout(header))


class ArchiveWriter:
    """Write an archive whose every stored tensor is known up front from its header.

    Entropy-coded codes may be shorter than their planned bound; their real sizes are put into
    `header` (its parts' `coded_nbytes`) when the archive is finished.
    """

    def __init__(self, path: Path, header: ArchiveHeader):
        self.path = Path(path)
        self.header = header
        self.stored = layout(bound_header(header))
        self._coded = {
            part_keys(p, t.name)[0]: (i, j)
            for i, t in enumerate(header.tensors)
            for j, p in enumerate(t.parts)
            if p.codec == "zstd"
        }
        self._sizes: dict[str, int] = {}
        self._next = 0
        self._checksums: dict[str, int] = {}
        self._file = None
        self._tmp: Path | None = None

    def __enter__(self) -> ArchiveWriter:
        """Create the temporary file. The name is chosen before the file exists, so that an
        interrupt at any point of this method still lets `_discard` remove it."""
        directory = self.path.parent if str(self.path.parent) else Path(".")
        try:
            self._tmp = directory / f".{self.path.name}.{secrets.token_hex(4)}.tmp"
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._file = os.fdopen(fd, "wb")
            self._header_len = reserved_header_length(self.header)
            self._file.write(b"\0" * self._header_len)
        except BaseException as exc:
            self._discard()
            if isinstance(exc, OSError):
                where = f"in {directory}" if self._file is None else self.path
                raise TvqError(f"cannot write {where}: {exc.strerror}") from None
            raise
        return self

    def write(self, key: str, data: np.ndarray | bytes | memoryview) -> None:
        """Append the next stored tensor; keys must come in layout order with exact sizes."""
        if self._next >= len(self.stored):
            raise TvqError(f"internal error: unexpected tensor {key}")
        expected = self.stored[self._next]
        view = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data)
        view = view.cast("B") if view.ndim != 1 or view.format != "B" else view
        size_ok = (
            view.nbytes <= expected.nbytes if key in self._coded else view.nbytes == expected.nbytes
        )
        if key != expected.key or not size_ok:
            raise TvqError(
                f"internal error: wrote {key} ({view.nbytes} bytes), "
                f"expected {expected.key} ({expected.nbytes} bytes)"
            )
        self._checksums[key] = crc32(view)
        self._sizes[key] = view.nbytes
        try:
            self._file.write(view)
        except OSError as exc:
            raise TvqError(f"cannot write {self.path}: {exc.strerror}") from None
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self.stored):
            missing = self.stored[self._next].key
            raise TvqError(f"internal error: archive incomplete, {missing} was never written")
        for key, (i, j) in self._coded.items():
            entry = self.header.tensors[i]
            parts = list(entry.parts)  # entries may share one parts list
            parts[j] = replace(parts[j], coded_nbytes=self._sizes[key])
            entry.parts = parts
        self.stored = layout(self.header)
        header_bytes = encode_header(
            self.header, self.stored, self._checksums, reserve=self._header_len
        )
        try:
            self._file.seek(0)
            self._file.write(header_bytes)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.chmod(self._tmp, 0o666 & ~_umask())
            os.replace(self._tmp, self.path)
        except OSError as exc:
            raise TvqError(f"cannot write {self.path}: {exc.strerror}") from None
        self._tmp = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finish()
                return
            except BaseException:
                self._discard()
                raise
        self._discard()

    def _discard(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
