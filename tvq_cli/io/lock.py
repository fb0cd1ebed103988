"""One writer at a time for an output that is read, changed and written back (`tvq add`,
`tvq remove`): two at once would each write the old archive plus their own change, and one
change would be lost without a word.

An exclusive `flock` on a hidden `.NAME.lock` file beside the target, taken without waiting: a
second writer fails at once with a clear error. The kernel releases the lock when its holder
exits, however it exits, so a killed run never leaves the target locked; the lock file is
removed by its holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import TvqError


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Hold the write lock of `target` for the block; a TvqError if another process holds it."""
    path = lock_path(Path(target))
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TvqError(f"cannot lock {target}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise TvqError(
                    f"{target}: another tvq process is changing it; try again when it is done"
                ) from None
            raise TvqError(f"cannot lock {target}: {exc.strerror}") from None
        try:  # the holder before us may have removed the file we locked: lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
