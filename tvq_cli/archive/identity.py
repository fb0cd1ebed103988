"""Which fine-tune a task was packed from.

Format 2 records each task's fingerprint (`TaskInfo.fingerprint`: its checkpoint's, or a LoRA
adapter's, tensors as read); a version 1 archive does not, and `check_task_source` then has
nothing to compare (`inspect --against` also runs the statistical checks of
`report.identity`). Readers that rebuild or compare a fine-tune call `check_task_source`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TvqError
from .format import ArchiveHeader

if TYPE_CHECKING:
    from ..io.task_source import TaskSource


def task_fingerprint(header: ArchiveHeader, task: str) -> str | None:
    """The fingerprint (`TaskSource.fingerprint`, for a checkpoint `Checkpoint.fingerprint`) of
    the fine-tune `task` was packed from; None: the archive (format 1) does not record it."""
    return header.info(task).fingerprint


def check_task_source(header: ArchiveHeader, task: str, finetuned: TaskSource) -> None:
    """Refuse a fine-tune that is not the one `task` was packed from, where the archive says
    which one that was."""
    expected = task_fingerprint(header, task)
    if expected is not None and finetuned.fingerprint() != expected:
        raise TvqError(
            f"{finetuned.path}: is not the fine-tune task {task!r} was packed from "
            "(fingerprints differ)"
        )
