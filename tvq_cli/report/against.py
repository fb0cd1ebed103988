"""`tvq inspect --against`: the error the archive adds, measured against the fine-tunes it was
packed from (reads checkpoints, so it is the part of inspect that needs torch)."""

from __future__ import annotations

from pathlib import Path

from ..archive.identity import check_task_source
from ..archive.reader import Archive
from ..errors import TvqError, UsageError, warn
from ..io.checkpoint import Checkpoint
from ..io.compat import check_pretrained
from ..io.task_source import TaskSource
from ..io.tasks import open_tasks
from ..stats import ErrorStats
from .identity import CrossMatch, check_distance, check_order


def error_report(
    archive: Archive,
    pretrained: Path,
    finetuned: list[Path],
    per_tensor: bool = False,
    allow_different_base: bool = False,
) -> tuple[list[dict], dict, list[dict]]:
    """Per-task and overall error of the reconstructed task vectors against the true ones.

    Fine-tunes (any form `pack` reads) are matched to the archive's tasks in order; a swapped
    order or a wrong file is an error (the fingerprint each task recorded, else the statistical
    checks of `identity`, a warning where those cannot tell for sure).
    """
    tasks = archive.header.tasks
    if len(finetuned) != len(tasks):
        raise UsageError(
            f"--against needs the pretrained checkpoint and {len(tasks)} fine-tuned ones "
            f"(tasks {', '.join(tasks)}), got {len(finetuned)}"
        )
    pre = Checkpoint(pretrained)
    check_pretrained(pre)
    names = {t.name for t in archive.header.tensors}
    if set(pre.specs) != names:
        missing = sorted(set(pre.specs) ^ names)[0]
        raise TvqError(f"{pretrained}: tensor {missing} does not match the archive's tensors")
    if pre.fingerprint() != archive.header.pretrained_fingerprint:
        if not allow_different_base:
            raise TvqError(
                f"{pretrained}: is not the pretrained checkpoint this archive was packed from "
                "(use --allow-different-base to measure against it anyway)"
            )
        warn(
            f"measuring against {pretrained}, not the pretrained model the archive was packed from"
        )
    fts = open_tasks(finetuned, pre)
    try:
        totals, rows = _measure(archive, pre, fts, per_tensor)
    finally:
        for source in fts:
            source.close()
    overall = ErrorStats()
    for task in tasks:
        overall.merge(totals[task])
    return [{"name": t, **totals[t].as_dict()} for t in tasks], overall.as_dict(), rows


def _measure(
    archive: Archive, pre: Checkpoint, fts: list[TaskSource], per_tensor: bool
) -> tuple[dict[str, ErrorStats], list[dict]]:
    """Each task's error statistics (and per tensor), once each fine-tune is known to be the
    task's: its fingerprint (taken while it was read) and the statistical identity checks."""
    tasks = archive.header.tasks
    totals = {task: ErrorStats() for task in tasks}
    cross = CrossMatch(len(tasks))
    rows: list[dict] = []
    for entry in archive.header.tensors:
        if entry.kind == "shared":
            continue
        pre_t = pre.load_float(entry.name)
        decoded, given = [], []
        for task, source in zip(tasks, fts, strict=True):
            stats = ErrorStats()
            tau = source.load_float(entry.name) - pre_t
            tau_hat = archive.task_vector(task, entry.name, pre_t)
            stats.add(tau, tau_hat)
            decoded.append(cross.sample(tau_hat))
            given.append(cross.sample(tau))
            totals[task].merge(stats)
            if per_tensor:
                rows.append(
                    {"task": task, "tensor": entry.name, "kind": entry.kind, **stats.as_dict()}
                )
        cross.add(decoded, given)
    paths = [source.path for source in fts]
    check_order(tasks, paths, cross)  # first: a swap gets the order to give them in
    for task, source in zip(tasks, fts, strict=True):
        check_task_source(archive.header, task, source)
    low_rate = any(not p.dense for t in archive.header.tensors for p in t.parts)
    for task, path in zip(tasks, paths, strict=True):
        check_distance(task, path, totals[task].err2, totals[task].ref2, archive.scheme, low_rate)
    return totals, rows
