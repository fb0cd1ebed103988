"""Planning an archive before a byte of weights is read: task names, input checks, the
header with each task's record and small files."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ..archive.format import TASK_NAME_RE, ArchiveHeader, check_task_name
from ..archive.plan import plan_tensors
from ..errors import InternalError, UsageError, usage_errors
from ..io.checkpoint import Checkpoint
from ..io.task_source import TaskSource
from ..version import __version__
from .options import PackOptions
from .records import FINGERPRINT_PLACEHOLDER, StoredFiles, task_info


def default_task_name(path: Path) -> str:
    """A task's name from its path: the file stem, or the folder's name for model.safetensors."""
    path = Path(path)
    if path.is_file() and path.stem not in ("model", "pytorch_model"):
        return path.stem
    if path.is_file():
        return path.parent.resolve().name
    return path.resolve().name


def sanitized(raw: str) -> str:
    """A task name made of a file or folder name: NFC, each run of characters a name cannot
    hold (spaces, brackets, ':', ...) one '_', starting and ending with a letter or digit."""
    name = unicodedata.normalize("NFC", raw)
    if TASK_NAME_RE.match(name):
        return name
    name = re.sub(r"[^\w.+-]+", "_", name)
    return re.sub(r"^[\W_]+|[\W_]+$", "", name)


def task_names(
    finetuned: list[Path], overrides: dict[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """Names for the fine-tuned inputs, and notes on names changed from their paths.
    `overrides` maps a path (as given or resolved) to a name."""
    resolved = {
        str(Path(p).resolve()): unicodedata.normalize("NFC", n)
        for p, n in (overrides or {}).items()
    }
    names, notes = [], []
    for path in finetuned:
        name = resolved.get(str(Path(path).resolve()))
        if name is None:
            raw = default_task_name(path)
            name = sanitized(raw)
            if not TASK_NAME_RE.match(name):
                raise UsageError(
                    f"{path}: {raw!r} does not make a task name (letters, digits, '_', '.', "
                    f"'+', '-', at most 128): give one with --name NAME={path}"
                )
            if name != raw:
                notes.append(f"{path}: task name {name!r} (from {raw!r}; --name sets another)")
        with usage_errors():
            names.append(check_task_name(name))
    unknown = set(resolved) - {str(Path(p).resolve()) for p in finetuned}
    if unknown:
        raise UsageError(f"--name refers to {sorted(unknown)[0]}, which is not a fine-tuned input")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UsageError(f"duplicate task name {name!r}: give distinct names with --name")
        seen.add(name)
    return names, notes


@dataclass
class PackPlan:
    """The header to write, the small files it stores, and notes for people."""

    header: ArchiveHeader
    files: StoredFiles
    notes: list[str] = field(default_factory=list)


def plan_archive(
    pretrained: Checkpoint, finetuned: list[TaskSource], tasks: list[str], options: PackOptions
) -> PackPlan:
    """Which tensors are quantized, kept exact or shared, and how; what each task records."""
    if not finetuned:
        raise UsageError("give at least one fine-tuned checkpoint")
    if len(tasks) != len(finetuned):
        raise InternalError("one task name per fine-tuned checkpoint")
    files = StoredFiles()
    infos, notes = {}, []
    for task, source in zip(tasks, finetuned, strict=True):
        infos[task], skipped = task_info(source, files)
        notes += source.notes + skipped
    header = ArchiveHeader(
        scheme=options.scheme,
        tasks=list(tasks),
        tool_version=__version__,
        pretrained_fingerprint=FINGERPRINT_PLACEHOLDER,
        tensors=plan_tensors(
            pretrained.specs, options.parts(tasks), options.keep, options.vector_parts(tasks)
        ),
        error_correction=options.error_correction if options.rules.corrects_error else None,
        task_info=infos,
        files=files.blobs,
    )
    return PackPlan(header, files, notes)


def plan_pack(
    pretrained: Checkpoint, finetuned: list[TaskSource], tasks: list[str], options: PackOptions
) -> ArchiveHeader:
    """The archive header (`plan_archive` without the files' bytes)."""
    return plan_archive(pretrained, finetuned, tasks, options).header
