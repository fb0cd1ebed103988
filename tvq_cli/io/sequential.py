"""A file written once, front to back, that bypasses the page cache where the system allows it.

Merged models are gigabytes written once and read later by another process. Written through
the page cache, every page of the output is a newly allocated page the kernel copies into; on a
machine whose page cache is full, or in a VM whose free memory is handed back to the host, that
allocation is the most expensive step of a merge (measured: 0.65 GB/s and 4 CPU seconds for a
2.2 GB output, against 1.7 GB/s and 0.2 CPU seconds with O_DIRECT), and the file is fsynced at
the end anyway. Here the bytes are gathered in an aligned staging buffer and written with
O_DIRECT in large aligned chunks; the last chunk is padded and the file truncated to its size.
Where O_DIRECT is refused (tmpfs, some network file systems, other platforms) the same object
writes through the page cache.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

ALIGN = 4096  # O_DIRECT offsets, sizes and buffers: a multiple of the logical block size
STAGING = 8 << 20  # bytes gathered per write


class SequentialFile:
    """`write` bytes in order, then `close` (which fsyncs); a binary file's interface."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0)
        self._fd = -1
        if direct:
            try:
                self._fd = os.open(self.path, flags | direct, 0o666)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        self._direct = self._fd >= 0
        if not self._direct:
            self._fd = os.open(self.path, flags, 0o666)
        self._stage = mmap.mmap(-1, STAGING) if self._direct else None  # page-aligned
        self._staged = 0
        self.size = 0

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if not self._direct:
            _write_all(self._fd, view)
        else:
            done = 0
            while done < len(view):
                step = min(len(view) - done, STAGING - self._staged)
                self._stage[self._staged : self._staged + step] = view[done : done + step]
                self._staged += step
                done += step
                if self._staged == STAGING:
                    self._flush(STAGING)
        self.size += len(view)
        return len(view)

    def _flush(self, nbytes: int) -> None:
        """Write the first `nbytes` (a multiple of ALIGN) of the staging buffer."""
        try:
            _write_all(self._fd, memoryview(self._stage)[:nbytes])
        except OSError as exc:  # accepted at open, refused at write: go through the cache
            if exc.errno != errno.EINVAL or os.lseek(self._fd, 0, os.SEEK_CUR) % ALIGN:
                raise
            import fcntl

            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self._direct = False
            _write_all(self._fd, memoryview(self._stage)[: self._staged])
        self._staged = 0

    def flush(self) -> None:
        """Nothing to do until `close`: staged bytes go out in aligned chunks."""

    def close(self) -> None:
        """Write what is staged (padded to ALIGN, then cut to size), fsync and close."""
        if self._fd < 0:
            return
        try:
            if self._direct and self._staged:
                padded = -(-self._staged // ALIGN) * ALIGN
                self._stage[self._staged : padded] = bytes(padded - self._staged)
                self._flush(padded)
                os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1
            if self._stage is not None:
                self._stage.close()

    def __enter__(self) -> SequentialFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view) :]
