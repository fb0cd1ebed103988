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
    """`write` bytes in order, then `close` (which fsyncs); a binary file's interface. A
    `seek` (to patch a header written first) sends everything after it through the page
    cache. `exclusive`: create the file, failing if it exists, with permissions `mode`."""

    def __init__(self, path: Path | str, exclusive: bool = False, mode: int = 0o666):
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        flags |= os.O_EXCL if exclusive else os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0)
        self._fd = -1
        if direct:
            try:
                self._fd = os.open(self.path, flags | direct, mode)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        self._direct = self._fd >= 0
        if not self._direct:
            self._fd = os.open(self.path, flags, mode)
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
        self.size = max(self.size, os.lseek(self._fd, 0, os.SEEK_CUR) + self._staged)
        return len(view)

    def _flush(self, nbytes: int) -> None:
        """Write the first `nbytes` (a multiple of ALIGN) of the staging buffer."""
        try:
            _write_all(self._fd, memoryview(self._stage)[:nbytes])
        except OSError as exc:  # accepted at open, refused at write: go through the cache
            if exc.errno != errno.EINVAL or os.lseek(self._fd, 0, os.SEEK_CUR) % ALIGN:
                raise
            self._buffered()
            return
        self._staged = 0

    def _buffered(self) -> None:
        """From here on through the page cache: staged bytes are written as they are."""
        import fcntl

        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self._direct = False
        _write_all(self._fd, memoryview(self._stage)[: self._staged])
        self._staged = 0

    def seek(self, offset: int) -> int:
        """Move to `offset` of what was written (a header to patch); writes go through the
        page cache from here on."""
        if self._direct:
            self._buffered()
        return os.lseek(self._fd, offset, os.SEEK_SET)

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

    def abandon(self) -> None:
        """Close without writing what is staged (the file is being deleted)."""
        if self._fd >= 0:
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
