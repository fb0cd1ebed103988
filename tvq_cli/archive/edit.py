"""Changing which tasks an archive holds without re-encoding the others (`tvq remove`; `tvq
add` builds on `copy_stored`). The archive is rewritten whole under a temporary name and
renamed into place (`ArchiveWriter`), under the output's lock (`io.target.claim_output`), so
that a second writer fails at once rather than write the old archive plus its own change."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..io.target import claim_output
from ..version import __version__
from . import schemes
from .format import ArchiveHeader, StoredTensor
from .reader import Archive
from .writer import ArchiveWriter


def without_tasks(header: ArchiveHeader, removed: list[str]) -> ArchiveHeader:
    """The header of the same archive without `removed`: their parts, records and the files
    no remaining task uses are dropped; everything else is as stored."""
    keep = [t for t in header.tasks if t not in removed]
    infos = {t: header.info(t) for t in keep}
    used = {sha for info in infos.values() for sha in info.files.values()}
    gone = {schemes.get(header.scheme).task_role(t) for t in removed}
    edited = ArchiveHeader(
        scheme=header.scheme,
        tasks=keep,
        tool_version=__version__,
        pretrained_fingerprint=header.pretrained_fingerprint,
        tensors=[
            replace(t, parts=[p for p in t.parts if p.task is None or p.task in keep])
            for t in header.tensors
        ],
        error_correction=header.error_correction,
        task_info=infos,
        files={sha: blob for sha, blob in header.files.items() if sha in used},
        frames={role: size for role, size in header.frames.items() if role not in gone},
    )
    edited.validate()
    return edited


def copy_stored(
    writer: ArchiveWriter,
    archive: Archive,
    stored: list[StoredTensor],
    new: Callable[[str], np.ndarray | bytes | memoryview | None] = lambda key: None,
) -> None:
    """Write `stored` in order: each key's `new` bytes, else the archive's (checksum verified)."""
    for s in stored:
        data = new(s.key)
        writer.write(s.key, archive.raw(s.key) if data is None else data)


def remove_tasks(path: Path | str, tasks: list[str]) -> ArchiveHeader:
    """Drop `tasks` from the archive at `path`, in place; returns the new header.

    RTVQ keeps its shared base (the mean over the tasks it was packed with), so the remaining
    tasks decode exactly as before.
    """
    archive = Archive(path)
    root, sharded = archive.root, archive.sharded
    archive.close()
    with claim_output(root, True, [], sharded):  # one writer: read, change, write back
        archive = Archive(root)  # reopened under the lock: the version no one else changes
        try:
            unknown = [t for t in tasks if t not in archive.tasks]
            if unknown:
                raise UsageError(
                    f"{root}: has no task {unknown[0]!r} (it holds {', '.join(archive.tasks)})"
                )
            if set(tasks) >= set(archive.tasks):
                raise UsageError(
                    f"{root}: removing {', '.join(tasks)} would leave no task; delete the archive "
                    "instead"
                )
            header = without_tasks(archive.header, tasks)
            with ArchiveWriter(root, header, archive.max_shard_bytes, replace=True) as writer:
                copy_stored(writer, archive, writer.stored)
        finally:
            archive.close()
    return header
