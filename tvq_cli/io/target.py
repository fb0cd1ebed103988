"""Who may write an output, and over what.

- Never over an input, and over an existing output only when asked (`--force`).
- A folder is replaced only if tvq wrote it: every folder tvq writes holds a manifest,
  `.tvq-output.json`, listing each file it wrote with its size. A folder without one, or
  holding any file the manifest does not list (or one whose size changed), is refused, never
  emptied.
- One writer per output: a writer holds an exclusive lock (`flock`) on `.NAME.tvq-lock`
  beside the output from its last checks to the rename, so a second writer fails at once
  with a clear error. A lock dies with its process, so a killed run never blocks the next.
- Temporary files and folders are named `.NAME.tvq-XXXXXXXX.tmp` beside the output (the X's
  random, as `tempfile` makes them). Any found
  by the writer that holds the lock were left by a run that was killed (a live writer would
  hold the lock): they are removed, and named in a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import TvqError, warn
from ..version import __version__

try:
    import fcntl
except ImportError:  # not POSIX: one writer per output is then up to the user
    fcntl = None

MANIFEST = ".tvq-output.json"


def temp_path(out: Path) -> Path:
    """A fresh temporary name beside `out` (a file or a folder is then created there)."""
    return _folder_of(out) / f".{out.name}.tvq-{secrets.token_hex(4)}.tmp"


def lock_path(out: Path) -> Path:
    return _folder_of(out) / f".{out.name}.tvq-lock"


def _folder_of(out: Path) -> Path:
    return out.parent if str(out.parent) else Path(".")


def _temps_of(out: Path) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(out.name)}\.tvq-[0-9a-f]{{8}}\.tmp")
    return sorted(p for p in _folder_of(out).iterdir() if pattern.fullmatch(p.name))


def check_target(out: Path, overwrite: bool, inputs: list[Path], folder: bool = False) -> None:
    """Refuse to write over an input, over an existing output unless `overwrite`, over a
    folder tvq did not write, or a file over a folder and the reverse."""
    resolved = out.resolve()
    for path in inputs:
        p = path.resolve()
        if resolved == p or resolved in p.parents:
            raise TvqError(f"{out}: refusing to overwrite an input checkpoint")
    if not _folder_of(out).is_dir():
        raise TvqError(f"{_folder_of(out)}: no such folder")
    if not (out.exists() or out.is_symlink()):
        return
    if folder and out.is_symlink():
        raise TvqError(f"{out}: is a symbolic link; give the folder's own path")
    if folder and not out.is_dir():
        raise TvqError(f"{out}: is a file, and the output is a folder; choose another --out")
    if not folder and out.is_dir():
        raise TvqError(f"{out}: is a folder, and the output is a file; choose another --out")
    if not overwrite:
        raise TvqError(f"{out}: already exists (use --force to overwrite)")
    if folder:
        check_replaceable(out)


def check_replaceable(folder: Path) -> None:
    """A folder may be replaced if it is empty or holds exactly the files tvq wrote there."""
    found = _files_in(folder)
    if not found:
        return
    listed = _read_manifest(folder)
    if listed is None:
        raise TvqError(
            f"{folder}: was not written by tvq (no {MANIFEST}); refusing to replace it, even "
            "with --force: choose another --out, or remove it yourself"
        )
    foreign = sorted(name for name, size in found.items() if listed.get(name) != size)
    if foreign:
        raise TvqError(
            f"{folder}: holds {len(foreign)} file(s) tvq did not write there (or that changed "
            f"since), e.g. {foreign[0]}; refusing to replace it, even with --force"
        )


def write_manifest(folder: Path) -> None:
    """List every file under `folder` (its size by relative path) as tvq's own."""
    doc = {"written_by": "tvq", "tool_version": __version__, "files": _files_in(folder)}
    (folder / MANIFEST).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _files_in(folder: Path) -> dict[str, int]:
    """Every entry under `folder` but the manifest: files by size; anything else (an empty
    folder, a link, a device) as -1, which no manifest lists."""
    found: dict[str, int] = {}
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if name == MANIFEST:
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            found[name] = -1
        elif path.is_file():
            found[name] = path.stat().st_size
        elif not any(path.iterdir()):
            found[name] = -1
    return found


def _read_manifest(folder: Path) -> dict[str, int] | None:
    try:
        doc = json.loads((folder / MANIFEST).read_text())
        files = doc["files"] if doc.get("written_by") == "tvq" else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if not isinstance(files, dict):
        return None
    return {str(k): v for k, v in files.items() if isinstance(v, int)}


@contextlib.contextmanager
def claim_output(
    out: Path, overwrite: bool, inputs: list[Path], folder: bool = False
) -> Iterator[None]:
    """Hold `out` for this writer while the block writes it: take the lock, remove what a
    killed run left behind, and check the target again (now that no other tvq can change it)."""
    out = Path(out)
    check_target(out, overwrite, inputs, folder)
    with _lock(out):
        stale = _temps_of(out)
        for path in stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if stale:
            names = ", ".join(p.name for p in stale)
            warn(f"removed {len(stale)} temporary file(s) left by an interrupted run: {names}")
        check_target(out, overwrite, inputs, folder)
        yield


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TvqError(f"cannot write in {_folder_of(out)}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise TvqError(
                f"{out}: another tvq process{holder} is writing it; wait for it to finish"
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the writer before us removed the lock file meanwhile: take a new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # still holding the lock: no other writer can be using this file
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return f" (pid {int(os.pread(fd, 32, 0).split()[0])})"
    return ""
