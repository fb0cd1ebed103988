"""Streaming archive writer: header first, payload tensor by tensor, checksums patched last.

Writes to a hidden temporary file beside the target and renames it into place only when every
stored tensor has been written (`io.atomic.AtomicFile`), so an error or an interrupt never
leaves a partial archive.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import InternalError, TvqError
from ..io.atomic import AtomicFile
from .container import crc32, encode_header
from .format import ArchiveHeader, bound_header, layout, part_keys


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
    `header` (its parts' `coded_nbytes`) when the archive is finished. `replace`: the archive
    may replace an existing file.
    """

    def __init__(self, path: Path, header: ArchiveHeader, replace: bool = False):
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
        self._target = AtomicFile(self.path, replace)

    def __enter__(self) -> ArchiveWriter:
        try:
            self._file = self._target.open()
            self._header_len = reserved_header_length(self.header)
            self._file.write(b"\0" * self._header_len)
        except BaseException as exc:
            self._target.discard()
            if isinstance(exc, OSError):
                raise TvqError(f"cannot write {self.path}: {exc.strerror}") from None
            raise
        return self

    def write(self, key: str, data: np.ndarray | bytes | memoryview) -> None:
        """Append the next stored tensor; keys must come in layout order with exact sizes."""
        if self._next >= len(self.stored):
            raise InternalError(f"unexpected tensor {key}")
        expected = self.stored[self._next]
        view = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data)
        view = view.cast("B") if view.ndim != 1 or view.format != "B" else view
        size_ok = (
            view.nbytes <= expected.nbytes if key in self._coded else view.nbytes == expected.nbytes
        )
        if key != expected.key or not size_ok:
            raise InternalError(
                f"wrote {key} ({view.nbytes} bytes), "
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
            raise InternalError(f"archive incomplete, {missing} was never written")
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
        except OSError as exc:
            raise TvqError(f"cannot write {self.path}: {exc.strerror}") from None
        self._target.commit()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finish()
                return
            except BaseException:
                self._target.discard()
                raise
        self._target.discard()
