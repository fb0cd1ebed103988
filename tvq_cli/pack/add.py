"""`tvq add`: append tasks to an archive without re-encoding the tasks already in it.

Every stored tensor of the archive is copied as it is (checksums verified); only the new tasks
are quantized, each tensor with the settings the archive's first task has for it (so an
archive allocated under `--budget` keeps its per-tensor bits). A scheme with shared roles
(RTVQ's base) keeps them: a new task stores its inputs less what they reconstruct
(`Scheme.own_values`), so RTVQ's base stays the mean of the tasks it was packed with, and a new
task's offset is larger than if the base had been its mean too (docs/cli.md measures the cost
against packing all tasks again).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from ..archive import schemes
from ..archive.edit import copy_stored
from ..archive.format import (
    ArchiveHeader,
    TensorEntry,
    delta_key,
    entry_layout,
    file_key,
    files_layout,
    rows_key,
)
from ..archive.parts import encode_part
from ..archive.reader import Archive
from ..archive.writer import ArchiveWriter
from ..concurrency import check_threads, torch_threads
from ..dtypes import to_torch
from ..errors import TvqError
from ..io.checkpoint import Checkpoint, combine_digests, tensor_digest
from ..io.compat import check_pretrained
from ..io.lock import exclusive
from ..io.model_writer import parse_size
from ..io.task_source import TaskSource
from ..io.tasks import open_tasks
from ..quant.quantizer import quantize
from ..tensors import require_finite, tensor_bytes
from ..version import __version__
from .plan import task_names
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
    root = opened.root
    opened.close()
    start = time.perf_counter()
    with exclusive(root):
        opened = Archive(root)  # reopened under the lock: the version no one else changes
        pre = Checkpoint(pretrained)
        sources: list[TaskSource] = []
        try:
            max_shard = _shard_size(opened, max_shard_size)
            check_pretrained(pre)
            opened.check_model(pre)
            taken = [t for t in tasks if t in opened.tasks]
            if taken:
                raise TvqError(
                    f"{root}: already holds a task {taken[0]!r}: give the new one another name "
                    "with --name, or remove the old one first (tvq remove)"
                )
            sources = open_tasks(finetuned, pre)
            header, files, more = _extended(opened.header, tasks, sources)
            with ArchiveWriter(root, header, max_shard) as writer, torch_threads(threads):
                digests = _write(writer, header, opened, pre, tasks, sources, files)
                if combine_digests(digests) != header.pretrained_fingerprint:
                    raise TvqError(
                        f"{pre.path}: is not the pretrained checkpoint {root} was packed from "
                        "(fingerprints differ)"
                    )
                for task, source in zip(tasks, sources, strict=True):
                    header.task_info[task].fingerprint = source.fingerprint()
        finally:
            for source in sources:
                source.close()
            pre.close()
            opened.close()
    seconds = time.perf_counter() - start
    return PackResult(root, header, archive_bytes(root), seconds, None, notes + more)


def _shard_size(archive: Archive, given: int | str | None) -> int | None:
    if given is None:
        return archive.max_shard_bytes
    if not archive.sharded:
        raise TvqError(
            f"{archive.path}: is one file; --max-shard-size changes the shards of a sharded "
            "archive (pack again with --max-shard-size to shard it)"
        )
    return parse_size(given)


def _extended(
    header: ArchiveHeader, tasks: list[str], sources: list[TaskSource]
) -> tuple[ArchiveHeader, StoredFiles, list[str]]:
    """The header with the new tasks appended, the new small files, and notes."""
    files = StoredFiles()
    infos, notes = {t: header.info(t) for t in header.tasks}, []
    for task, source in zip(tasks, sources, strict=True):
        infos[task], skipped = task_info(source, files)
        notes += source.notes + skipped
    tensors = [_with_parts(entry, header, tasks) for entry in header.tensors]
    extended = ArchiveHeader(
        scheme=header.scheme,
        tasks=header.tasks + tasks,
        tool_version=__version__,
        pretrained_fingerprint=header.pretrained_fingerprint,
        tensors=tensors,
        error_correction=header.error_correction,
        task_info=infos,
        files={**header.files, **files.blobs},
    )
    extended.validate()
    return extended, files, notes


def _with_parts(entry: TensorEntry, header: ArchiveHeader, tasks: list[str]) -> TensorEntry:
    """The entry with a part for each new task, set as the first task's own part."""
    if entry.kind != "quantized":
        return replace(entry, parts=[])
    scheme = schemes.get(header.scheme)
    model = next(p for p in entry.parts if p.role == scheme.task_role(header.tasks[0]))
    new = [replace(model, role=scheme.task_role(t), coded_nbytes=0) for t in tasks]
    return replace(entry, parts=[*entry.parts, *new])


def _write(
    writer: ArchiveWriter,
    header: ArchiveHeader,
    archive: Archive,
    pre: Checkpoint,
    tasks: list[str],
    sources: list[TaskSource],
    files: StoredFiles,
) -> dict[str, bytes]:
    """Every stored tensor in layout order: the archive's as stored, the new tasks' coded
    now. Returns the pretrained tensors' digests."""
    digests: dict[str, bytes] = {}
    for entry in header.tensors:
        raw = pre.load(entry.name)
        digests[entry.name] = tensor_digest(entry.name, raw)
        new = _new_outputs(header, archive, entry, raw, pre.path, tasks, sources)
        copy_stored(writer, archive, entry_layout(header, entry), new.get)
    frames = {file_key(sha): frame for sha, frame in files.frames.items()}
    copy_stored(writer, archive, files_layout(header), frames.get)
    return digests


def _new_outputs(
    header: ArchiveHeader,
    archive: Archive,
    entry: TensorEntry,
    raw: torch.Tensor,
    pre_path: Path,
    tasks: list[str],
    sources: list[TaskSource],
) -> dict[str, object]:
    """The stored tensors of one tensor for the new tasks, by key."""
    out: dict[str, object] = {}
    name, scheme = entry.name, archive.scheme
    pre = None if entry.kind == "shared" else require_finite(raw.to(torch.float32), pre_path, name)
    stored = archive.entry(name)
    stored_parts = {p.role: p for p in stored.parts}

    def shared_role(role: str) -> torch.Tensor:
        return archive.dequantized(stored_parts[role], stored)

    for task, source in zip(tasks, sources, strict=True):
        full = source.load_full(name)
        value = full[: entry.shape[0]] if name in source.rows else full
        if name in source.rows:
            dtype = to_torch(header.info(task).dtype_of(entry))
            added = require_finite(full[entry.shape[0] :], source.path, name).to(dtype)
            out[rows_key(task, name)] = tensor_bytes(added)
        if pre is None:
            if not torch.equal(value, raw):
                raise TvqError(
                    f"{source.path}: non-float tensor {name} differs from the pretrained one"
                )
            continue
        values = require_finite(value.to(torch.float32), source.path, name)
        if entry.kind == "exact":  # exact tensors are deltas whatever the scheme
            out[delta_key(task, name)] = tensor_bytes(values - pre)
            continue
        if scheme.subtracts_pretrained:
            values = values - pre
        part = next(p for p in entry.parts if p.role == scheme.task_role(task))
        values = scheme.own_values(values, shared_role)
        out.update(encode_part(part, name, quantize(values, part.spec)))
    return out
