"""Outputs that appear whole or not at all, and never over an input or an unasked-for file.

Everything is written under a hidden temporary name beside the target and renamed into place
only when complete, so an error or an interrupt never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import TvqError
from .sequential import SequentialFile


def check_target(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse to clobber inputs, or an existing output unless asked to."""
    resolved = out.resolve()
    for path in inputs:
        p = path.resolve()
        if resolved == p or resolved in p.parents:
            raise TvqError(f"{out}: refusing to overwrite an input checkpoint")
    if out.exists() and not overwrite:
        raise TvqError(f"{out}: already exists (use --force to overwrite)")
    if not out.parent.exists():
        raise TvqError(f"{out.parent}: no such folder")


@contextlib.contextmanager
def atomic_output(out: Path, folder: bool) -> Iterator[Path]:
    """Yield a temporary path beside `out`; move it into place only if the block succeeds."""
    directory = out.parent if str(out.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=directory))
    except OSError as exc:
        raise TvqError(f"cannot write in {directory}: {exc.strerror}") from None
    staged = tmp / out.name
    try:
        yield staged
        if folder:
            staged.mkdir(exist_ok=True)
        if out.is_dir() and not out.is_symlink():
            trash = tmp / ".replaced"
            os.replace(out, trash)
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class AtomicFile:
    """One file written under a hidden temporary name beside `path` (created exclusively, so
    two writers never share it), renamed into place by `commit` once flushed to disk, with the
    permissions a new file would get; `discard` removes it. Errors are one-line TvqErrors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.directory = self.path.parent if str(self.path.parent) else Path(".")
        self._tmp: Path | None = None
        self.file: SequentialFile | None = None

    def open(self) -> SequentialFile:
        """Create the temporary file. Its name is set before it exists, so that an interrupt
        at any point still lets `discard` remove it."""
        self._tmp = self.directory / f".{self.path.name}.{secrets.token_hex(4)}.tmp"
        try:
            self.file = SequentialFile(self._tmp, exclusive=True, mode=0o600)
        except OSError as exc:
            self.discard()
            raise TvqError(f"cannot write in {self.directory}: {exc.strerror}") from None
        return self.file

    def commit(self) -> None:
        try:
            self.file.close()  # written out and fsynced
            os.chmod(self._tmp, 0o666 & ~_umask())
            os.replace(self._tmp, self.path)
        except OSError as exc:
            raise TvqError(f"cannot write {self.path}: {exc.strerror}") from None
        self._tmp = None

    def discard(self) -> None:
        if self.file is not None:
            self.file.abandon()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
