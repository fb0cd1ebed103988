"""Outputs that appear whole or not at all.

Everything is written under a hidden temporary name beside the target (`target.temp_path`)
and moved into place only when complete, so an error or an interrupt never leaves a
half-written output. Without `replace` the move never clobbers: an output that appeared
meanwhile is kept and this one is discarded. Which targets may be written at all, and by
one writer at a time, is `target`'s job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import TvqError
from .sequential import SequentialFile
from .target import check_replaceable, temp_path, write_manifest


@contextlib.contextmanager
def atomic_output(out: Path, folder: bool, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `out`; move it into place only if the block succeeds.
    A folder gets tvq's manifest (`target.MANIFEST`) and replaces an old one only if tvq
    wrote that one."""
    tmp = temp_path(out)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise TvqError(f"cannot write in {tmp.parent}: {exc.strerror}") from None
    staged = tmp / out.name
    try:
        yield staged
        if folder:
            staged.mkdir(exist_ok=True)
            _write(out, lambda: write_manifest(staged))
        if replace and out.is_dir() and not out.is_symlink():
            check_replaceable(out)  # again: the user may have put a file there meanwhile
            _write(out, lambda: os.replace(out, tmp / ".replaced"))
        _move(staged, out, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class AtomicFile:
    """One file written under a hidden temporary name beside `path` (created exclusively, so
    two writers never share it), moved into place by `commit` once flushed to disk, with the
    permissions a new file would get; `discard` removes it. Errors are one-line TvqErrors."""

    def __init__(self, path: Path, replace: bool = False):
        self.path = Path(path)
        self.replace = replace
        self._tmp: Path | None = None
        self.file: SequentialFile | None = None

    def open(self) -> SequentialFile:
        """Create the temporary file. Its name is set before it exists, so that an interrupt
        at any point still lets `discard` remove it."""
        self._tmp = temp_path(self.path)
        try:
            self.file = SequentialFile(self._tmp, exclusive=True, mode=0o600)
        except OSError as exc:
            self.discard()
            raise TvqError(f"cannot write in {self._tmp.parent}: {exc.strerror}") from None
        return self.file

    def commit(self) -> None:
        def finish() -> None:
            self.file.close()  # written out and fsynced
            os.chmod(self._tmp, 0o666 & ~_umask())

        _write(self.path, finish)
        _move(self._tmp, self.path, self.replace)
        self._tmp = None

    def discard(self) -> None:
        if self.file is not None:
            self.file.abandon()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def _move(staged: Path, out: Path, replace: bool) -> None:
    """Rename `staged` to `out`; without `replace`, never over something that appeared at
    `out` meanwhile (a hard link for files, which fails if `out` exists)."""
    if replace:
        _write(out, lambda: os.replace(staged, out))
        return
    if out.exists() or out.is_symlink():
        raise _appeared(out)
    if staged.is_dir():
        _write(out, lambda: os.rename(staged, out))
        return
    try:
        os.link(staged, out)
    except FileExistsError:
        raise _appeared(out) from None
    except OSError:  # a file system without hard links
        _write(out, lambda: os.replace(staged, out))
        return
    staged.unlink()


def _appeared(out: Path) -> TvqError:
    return TvqError(f"{out}: appeared while tvq was writing it; kept it, discarded tvq's output")


def _write(path: Path, step) -> None:
    """Run a step of writing `path`; an OSError becomes one line naming `path`."""
    try:
        step()
    except OSError as exc:
        raise TvqError(f"cannot write {path}: {exc.strerror}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
