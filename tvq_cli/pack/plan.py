"""Planning an archive before a byte is read: task names, input checks, the header."""

from __future__ import annotations

from pathlib import Path

from ..archive.format import ArchiveHeader, check_task_name
from ..archive.plan import plan_tensors
from ..errors import InternalError, UsageError, usage_errors
from ..io.checkpoint import Checkpoint
from ..io.compat import check_compatible
from ..version import __version__
from .options import PackOptions

FINGERPRINT_PLACEHOLDER = "sha256:" + "0" * 64


def default_task_name(path: Path) -> str:
    """A task's name from its path: the file stem, or the folder's name for model.safetensors."""
    path = Path(path)
    if path.is_file() and path.stem not in ("model", "pytorch_model"):
        return path.stem
    if path.is_file():
        return path.parent.resolve().name
    return path.resolve().name


def task_names(finetuned: list[Path], overrides: dict[str, str] | None = None) -> list[str]:
    """Names for the fine-tuned inputs; `overrides` maps a path (as given or resolved) to a name."""
    resolved = {str(Path(p).resolve()): n for p, n in (overrides or {}).items()}
    names = []
    for path in finetuned:
        name = resolved.get(str(Path(path).resolve())) or default_task_name(path)
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
    return names


def plan_pack(
    pretrained: Checkpoint, finetuned: list[Checkpoint], tasks: list[str], options: PackOptions
) -> ArchiveHeader:
    """The archive header: which tensors are quantized, kept exact or shared, and how."""
    if not finetuned:
        raise UsageError("give at least one fine-tuned checkpoint")
    if len(tasks) != len(finetuned):
        raise InternalError("one task name per fine-tuned checkpoint")
    check_compatible(pretrained, finetuned)
    return ArchiveHeader(
        scheme=options.scheme,
        tasks=list(tasks),
        tool_version=__version__,
        pretrained_fingerprint=FINGERPRINT_PLACEHOLDER,
        tensors=plan_tensors(pretrained.specs, options.parts(tasks), options.keep),
        error_correction=options.error_correction if options.rules.corrects_error else None,
    )
