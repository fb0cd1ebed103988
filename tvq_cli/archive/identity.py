"""Which fine-tune a task was packed from.

The archive does not store a fingerprint of each fine-tune yet, only the pretrained model's.
`task_fingerprint` is where one plugs in: it returns None until the header carries one, and
`check_task_source` then has nothing to compare (`inspect --against` falls back on the
statistical checks of `report.identity`). Readers that rebuild or compare a fine-tune call
`check_task_source` before using it.
"""

from __future__ import annotations

from ..errors import TvqError
from ..io.checkpoint import Checkpoint
from .format import ArchiveHeader


def task_fingerprint(header: ArchiveHeader, task: str) -> str | None:  # noqa: ARG001
    """The fingerprint (`Checkpoint.fingerprint`) of the fine-tune `task` was packed from;
    None: this archive format does not record it."""
    return None


def check_task_source(header: ArchiveHeader, task: str, finetuned: Checkpoint) -> None:
    """Refuse a checkpoint that is not the fine-tune `task` was packed from, where the
    archive says which one that was."""
    expected = task_fingerprint(header, task)
    if expected is not None and finetuned.fingerprint() != expected:
        raise TvqError(
            f"{finetuned.path}: is not the fine-tune task {task!r} was packed from "
            "(fingerprints differ)"
        )
