"""`tvq add`: append tasks to an archive without re-encoding the tasks already in it.

Every stored tensor of the archive is copied as it is (checksums verified); only the new tasks
are quantized, through pack's own pipeline (`Prefetcher`, `TensorPacker`), each tensor with the
settings the archive's first task has for it (so an archive allocated under `--budget` keeps
its per-tensor bits). A scheme with shared roles (RTVQ's base) keeps them: a new task is coded
against the pretrained weights plus their reconstruction (`Scheme.anchor`), so RTVQ's base
stays the mean of the tasks it was packed with, and a new task's offset is larger than if the
base had been its mean too (docs/cli.md measures the cost against packing all tasks again).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..archive import schemes
from ..archive.edit import copy_stored
from ..archive.format import (
    ArchiveHeader,
    Part,
    TensorEntry,
    entry_layout,
    file_key,
    files_layout,
    frames_layout,
    record_bound,
)
from ..archive.reader import Archive
from ..archive.writer import ArchiveWriter
from ..concurrency import check_threads, torch_threads
from ..dtypes import itemsize
from ..errors import TvqError, UsageError, usage_errors
from ..io.checkpoint import Checkpoint, combine_digests
from ..io.compat import check_pretrained
from ..io.model_writer import parse_size
from ..io.target import claim_output
from ..io.task_source import TaskSource
from ..io.tasks import open_tasks
from ..tensors import require_finite
from ..version import __version__
from .frames import Frames
from .packer import TensorPacker, added_rows
from .plan import task_names
from .prefetch import Prefetcher, TensorInputs
from .records import StoredFiles, task_info
from .run import PackResult, archive_bytes


def add_tasks(
    archive: Path | str,
    pretrained: Path | str,
    finetuned: list[Path | str],
    names: dict[str, str] | None = None,
    *,
    threads: int | None = None,
    max_shard_size: int | str | None = None,
) -> PackResult:
    """Append fine-tunes of `pretrained` to the archive at `archive`, in place.

    `max_shard_size`: change a sharded archive's shard size (default: keep its own).
    """
    threads = check_threads(threads)
    finetuned = [Path(p) for p in finetuned]
    tasks, notes = task_names(finetuned, names)
    opened = Archive(archive)
    root, sharded = opened.root, opened.sharded
    opened.close()
    start = time.perf_counter()
    inputs = [Path(pretrained), *finetuned]
    with claim_output(root, True, inputs, sharded), contextlib.ExitStack() as stack:
        opened = Archive(root)  # reopened under the lock: the version no one else changes
        stack.callback(opened.close)
        pre = Checkpoint(pretrained)
        stack.callback(pre.close)
        max_shard = _shard_size(opened, max_shard_size)
        check_pretrained(pre)
        opened.check_model(pre)
        taken = [t for t in tasks if t in opened.tasks]
        if taken:
            raise UsageError(
                f"{root}: already holds a task {taken[0]!r}: give the new one another name "
                "with --name, or remove the old one first (tvq remove)"
            )
        sources = open_tasks(finetuned, pre)
        for source in sources:
            stack.callback(source.close)
        header, files, more = _extended(opened, tasks, sources)
        notes += more
        with ArchiveWriter(root, header, max_shard, replace=True) as writer:
            frames = Frames(header, [opened.scheme.task_role(t) for t in tasks])
            digests = _write(writer, header, opened, pre, tasks, sources, threads, frames)
            copy_stored(writer, opened, frames_layout(header), dict(frames.stored()).get)
            copy_stored(writer, opened, files_layout(header), _frames(files).get)
            if combine_digests(digests) != header.pretrained_fingerprint:
                raise TvqError(
                    f"{pre.path}: is not the pretrained checkpoint {root} was packed from "
                    "(fingerprints differ)"
                )
            for task, source in zip(tasks, sources, strict=True):
                header.task_info[task].fingerprint = source.fingerprint()
    seconds = time.perf_counter() - start
    return PackResult(root, header, archive_bytes(root), seconds, None, notes)


def _shard_size(archive: Archive, given: int | str | None) -> int | None:
    if given is None:
        return archive.max_shard_bytes
    if not archive.sharded:
        raise UsageError(
            f"{archive.path}: is one file; --max-shard-size changes the shards of a sharded "
            "archive (pack again with --max-shard-size to shard it)"
        )
    with usage_errors():
        return parse_size(given)


def _extended(
    archive: Archive, tasks: list[str], sources: list[TaskSource]
) -> tuple[ArchiveHeader, StoredFiles, list[str]]:
    """The header with the new tasks appended, their new small files, and notes."""
    header = archive.header
    files = StoredFiles()
    infos, notes = {t: header.info(t) for t in header.tasks}, []
    for task, source in zip(tasks, sources, strict=True):
        infos[task], skipped = task_info(source, files)
        notes += source.notes + skipped
    extended = ArchiveHeader(
        scheme=header.scheme,
        tasks=header.tasks + tasks,
        tool_version=__version__,
        pretrained_fingerprint=header.pretrained_fingerprint,
        tensors=[replace(e, parts=e.parts + _new_parts(e, archive, tasks)) for e in header.tensors],
        error_correction=header.error_correction,
        task_info=infos,
        files={**header.files, **files.blobs},
    )
    framed = {p.role for t in extended.tensors if t.framed for p in t.parts if not p.dense}
    # a new role's frame: its size is known once written (the writer reserves its bound)
    extended.frames = {r: header.frames.get(r, 1) for r in extended.roles if r in framed}
    extended.validate()
    return extended, files, notes


def _new_parts(entry: TensorEntry, archive: Archive, tasks: list[str]) -> list:
    """A part for each new task, set as the first task's own part of this tensor (a low-rate
    part: the step and dead zone of the first task's record)."""
    if entry.kind != "quantized":
        return []
    header = archive.header
    scheme = schemes.get(header.scheme)
    model = next(p for p in entry.parts if p.role == scheme.task_role(header.tasks[0]))
    if not model.dense:
        setting = archive.record(model, entry).setting
        size = 0 if entry.framed else record_bound(entry)  # the real size is set when written
        return [Part.low_rate(scheme.task_role(t), setting, size) for t in tasks]
    return [replace(model, role=scheme.task_role(t), coded_nbytes=0) for t in tasks]


def _frames(files: StoredFiles) -> dict[str, bytes]:
    return {file_key(sha): frame for sha, frame in files.frames.items()}


def _write(
    writer: ArchiveWriter,
    header: ArchiveHeader,
    archive: Archive,
    pre: Checkpoint,
    tasks: list[str],
    sources: list[TaskSource],
    threads: int,
    frames: Frames,
) -> dict[str, bytes]:
    """Every tensor's stored tensors in layout order: the archive's as stored, the new tasks'
    coded by pack's pipeline (their framed records into `frames`). Returns the pretrained
    tensors' digests."""
    scheme = archive.scheme
    new_parts = len(tasks)
    entries = [replace(e, parts=e.parts[len(e.parts) - new_parts :]) for e in header.tensors]
    largest = max(e.numel * itemsize(e.dtype) for e in entries)
    digests: dict[str, bytes] = {}
    with torch_threads(1), contextlib.ExitStack() as stack:
        packer = TensorPacker(
            scheme.added_tasks,
            archive.header.error_correction or False,
            tasks,
            pre.path,
            [s.path for s in sources],
            torch.device("cpu"),
            threads,
        )
        stack.callback(packer.close)
        reader = Prefetcher(entries, pre, sources, budget=largest * (1 + len(sources)))
        stack.callback(reader.close)
        reader.start()
        for entry, inputs in zip(header.tensors, reader, strict=True):
            digests[entry.name] = inputs.digest
            _anchor(archive, inputs, pre.path)
            new = dict(frames.split(packer.outputs(inputs)) + added_rows(header, tasks, inputs))
            reader.release(inputs)
            copy_stored(writer, archive, entry_layout(header, entry), new.get)
    return digests


def _anchor(archive: Archive, inputs: TensorInputs, pre_path: Path) -> None:
    """For a scheme with shared roles, code the new tasks' quantized parts against the
    pretrained weights plus what the shared roles reconstruct (RTVQ: the base)."""
    entry = inputs.entry
    if entry.kind != "quantized":
        return
    stored = archive.entry(entry.name)
    parts = {p.role: p for p in stored.parts}
    anchor = archive.scheme.anchor(lambda role: archive.dequantized(parts[role], stored))
    if anchor is not None:
        pre = require_finite(inputs.pretrained.to(torch.float32), pre_path, entry.name)
        inputs.pretrained = pre.add_(anchor)
