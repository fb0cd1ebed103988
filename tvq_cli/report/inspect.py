"""`tvq inspect`: what an archive costs (bytes by role, bits per weight) and what error it adds.

`inspect_archive` returns a plain dict with stable keys (schema in docs/cli.md) so that the same
report feeds the rich tables and `--json`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..archive.format import LOW_RATE, ArchiveHeader, Part, storage_class
from ..archive.identity import check_task_source
from ..archive.reader import Archive
from ..dtypes import itemsize
from ..errors import TvqError, UsageError, warn
from ..io.checkpoint import Checkpoint
from ..io.compat import check_pretrained
from ..io.task_source import TaskSource
from ..io.tasks import open_tasks
from ..stats import ErrorStats
from .identity import CrossMatch, check_distance, check_order


def quantization_settings(header: ArchiveHeader) -> list[dict]:
    """Parameters per (role, bits, group size, range, scale bits, codec): the allocation. A
    low-rate part's setting is in its record: its row has only role, codec and parameters."""
    settings: dict[tuple, int] = defaultdict(int)
    for entry in header.tensors:
        for p in entry.parts:
            key = (p.role.split(":")[0], p.bits, p.group_size, p.range, p.scale_bits, p.codec)
            settings[key] += entry.numel
    rows = []
    for (role, bits, group, rng, scale_bits, codec), count in sorted(settings.items()):
        row = {"role": role, "codec": codec, "parameters": count}
        if codec != LOW_RATE:
            row |= {"bits": bits, "group_size": group, "range": rng, "scale_bits": scale_bits}
        rows.append(row)
    return rows


def _part_row(p: Part) -> dict:
    if not p.dense:
        return {"role": p.role, "codec": p.codec}
    keys = ("role", "bits", "group_size", "range", "scale_bits", "codec")
    return {key: getattr(p, key) for key in keys}


def storage_summary(archive: Archive) -> dict:
    """Bytes by role, parameter counts, effective bits per weight and compression ratios."""
    header = archive.header
    by_class: dict[str, int] = defaultdict(int)
    for stored in archive.stored:
        by_class[storage_class(stored.key)] += stored.nbytes
    total = archive.file_size
    params = {
        kind: sum(t.numel for t in header.tensors if t.kind == kind)
        for kind in ("quantized", "exact", "shared")
    }
    original_bytes = sum(_original_bytes(header, task) for task in header.tasks)
    return {
        "archive": str(archive.path),
        "files": [str(p) for p in archive.paths],
        "format_version": header.version,
        "tool_version": header.tool_version,
        "scheme": header.scheme,
        "error_correction": header.error_correction,
        "pretrained_fingerprint": header.pretrained_fingerprint,
        "tasks": [task_record(header, name) for name in header.tasks],
        "quantization": quantization_settings(header),
        "parameters": {"total": header.parameters, **params},
        "tensors_count": {
            kind: sum(1 for t in header.tensors if t.kind == kind)
            for kind in ("quantized", "exact", "shared")
        },
        "bytes": {
            "codes": by_class["codes"],
            "scales": by_class["scales"],
            "exact": by_class["exact"],
            "files": by_class["files"],
            "header": archive.header_bytes,
            "total": total,
        },
        "bits_per_weight": header.bits_per_weight(total),
        "compression": {
            "vs_fp32": header.ratio_vs_fp32(total),
            "vs_original": original_bytes / total,
        },
    }


def _original_bytes(header: ArchiveHeader, task: str) -> int:
    """Bytes of a task's checkpoint in its own dtypes, added rows included."""
    info = header.info(task)
    total = 0
    for entry in header.tensors:
        rows = entry.numel // entry.shape[0] * info.rows.get(entry.name, 0) if entry.shape else 0
        total += (entry.numel + rows) * itemsize(info.dtype_of(entry))
    return total


def task_record(header: ArchiveHeader, task: str) -> dict:
    """What the archive records of a task's original checkpoint (docs/cli.md)."""
    info = header.info(task)
    return {
        "name": task,
        "source": info.source,
        "dtype": info.dtype,
        "dtypes": info.dtypes,
        "added_rows": info.rows,
        "copies": info.copies,
        "absent": info.absent,
        "renamed": None
        if info.renamed is None
        else {"removed": info.renamed[0], "added": info.renamed[1]},
        "files": {path: header.files[sha].size for path, sha in info.files.items()},
        "fingerprint": info.fingerprint,
    }


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


def inspect_archive(
    path: Path | str,
    against: tuple[Path | str, list[Path | str]] | None = None,
    per_tensor: bool = False,
    verify: bool = False,
    allow_different_base: bool = False,
) -> dict:
    """The full inspect report as a JSON-ready dict.

    `verify` first reads every stored tensor and checks its checksum and decoded ranges; the
    first damage raises TvqError.
    """
    archive = Archive(path)
    checked = archive.verify() if verify else None
    report = storage_summary(archive)
    if verify:
        report["verified"] = {"stored_tensors": len(archive.stored), "payload_bytes": checked}
    if against is not None:
        pretrained, finetuned = against
        tasks, overall, rows = error_report(
            archive,
            Path(pretrained),
            [Path(p) for p in finetuned],
            per_tensor,
            allow_different_base,
        )
        report["tasks"] = [
            {**record, **error} for record, error in zip(report["tasks"], tasks, strict=True)
        ]
        report["error"] = overall
        if per_tensor:
            report["tensors"] = rows
    elif per_tensor:
        report["tensors"] = [
            {
                "tensor": t.name,
                "kind": t.kind,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "parts": [_part_row(p) for p in t.parts],
            }
            for t in archive.header.tensors
        ]
    return report
