"""`tvq inspect`: what an archive costs (bytes by role, bits per weight) and what error it adds.

`inspect_archive` returns a plain dict with stable keys (schema in docs/cli.md) so that the same
report feeds the rich tables and `--json`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch

from ..archive.format import FORMAT_VERSION, ArchiveHeader, storage_class
from ..archive.identity import check_task_source
from ..archive.reader import Archive
from ..dtypes import itemsize
from ..errors import TvqError, UsageError, warn
from ..io.checkpoint import Checkpoint
from ..io.compat import check_compatible
from .identity import CrossMatch, check_distance, check_order


def quantization_settings(header: ArchiveHeader) -> list[dict]:
    """Parameters per (role, bits, group size, range, scale bits, codec): the allocation."""
    settings: dict[tuple, int] = defaultdict(int)
    for entry in header.tensors:
        for p in entry.parts:
            key = (p.role.split(":")[0], p.bits, p.group_size, p.range, p.scale_bits, p.codec)
            settings[key] += entry.numel
    return [
        {
            "role": role,
            "bits": bits,
            "group_size": group,
            "range": rng,
            "scale_bits": scale_bits,
            "codec": codec,
            "parameters": count,
        }
        for (role, bits, group, rng, scale_bits, codec), count in sorted(settings.items())
    ]


def storage_summary(archive: Archive) -> dict:
    """Bytes by role, parameter counts, effective bits per weight and compression ratios."""
    header = archive.header
    n_tasks = len(header.tasks)
    by_class: dict[str, int] = defaultdict(int)
    for stored in archive.stored:
        by_class[storage_class(stored.key)] += stored.nbytes
    total = archive.file_size
    params = {
        kind: sum(t.numel for t in header.tensors if t.kind == kind)
        for kind in ("quantized", "exact", "shared")
    }
    original_bytes = sum(t.numel * itemsize(t.dtype) for t in header.tensors)
    return {
        "archive": str(archive.path),
        "format_version": FORMAT_VERSION,
        "tool_version": header.tool_version,
        "scheme": header.scheme,
        "error_correction": header.error_correction,
        "pretrained_fingerprint": header.pretrained_fingerprint,
        "tasks": [{"name": name} for name in header.tasks],
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
            "header": archive.header_bytes,
            "total": total,
        },
        "bits_per_weight": header.bits_per_weight(total),
        "compression": {
            "vs_fp32": header.ratio_vs_fp32(total),
            "vs_original": n_tasks * original_bytes / total,
        },
    }


class _ErrorStats:
    """Running sums for rel-L2, cosine, max-abs and SNR of a reconstruction."""

    def __init__(self) -> None:
        self.err2 = self.ref2 = self.hat2 = self.dot = 0.0
        self.max_abs = 0.0
        self.count = 0

    def add(self, ref: torch.Tensor, hat: torch.Tensor) -> None:
        ref64, hat64 = ref.reshape(-1).double(), hat.reshape(-1).double()
        diff = hat64 - ref64
        self.err2 += float(diff @ diff)
        self.ref2 += float(ref64 @ ref64)
        self.hat2 += float(hat64 @ hat64)
        self.dot += float(ref64 @ hat64)
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))
        self.count += ref.numel()

    def merge(self, other: _ErrorStats) -> None:
        self.err2 += other.err2
        self.ref2 += other.ref2
        self.hat2 += other.hat2
        self.dot += other.dot
        self.max_abs = max(self.max_abs, other.max_abs)
        self.count += other.count

    def as_dict(self) -> dict:
        """rel_l2 and snr_db are null where the reference is all zeros (undefined ratio)."""
        rel = (
            math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else (0.0 if self.err2 == 0 else None)
        )
        denom = math.sqrt(self.ref2 * self.hat2)
        cosine = self.dot / denom if denom > 0 else (1.0 if self.err2 == 0 else 0.0)
        if self.err2 == 0:
            snr = None
        else:
            snr = 10 * math.log10(self.ref2 / self.err2) if self.ref2 > 0 else None
        return {
            "rel_l2": rel,
            "cosine": cosine,
            "max_abs_error": self.max_abs,
            "snr_db": snr,
            "parameters": self.count,
        }


def error_report(
    archive: Archive,
    pretrained: Path,
    finetuned: list[Path],
    per_tensor: bool = False,
    allow_different_base: bool = False,
) -> tuple[list[dict], dict, list[dict]]:
    """Per-task and overall error of the reconstructed task vectors against the true ones.

    Fine-tuned checkpoints are matched to the archive's tasks in order; a swapped order or a
    wrong file is an error (or, where it cannot be told for sure, a warning): `identity`.
    """
    tasks = archive.header.tasks
    if len(finetuned) != len(tasks):
        raise UsageError(
            f"--against needs the pretrained checkpoint and {len(tasks)} fine-tuned ones "
            f"(tasks {', '.join(tasks)}), got {len(finetuned)}"
        )
    pre = Checkpoint(pretrained)
    fts = [Checkpoint(p) for p in finetuned]
    check_compatible(pre, fts)
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
    for task, ckpt in zip(tasks, fts, strict=True):
        check_task_source(archive.header, task, ckpt)
    totals = {task: _ErrorStats() for task in tasks}
    cross = CrossMatch(len(tasks))
    rows: list[dict] = []
    for entry in archive.header.tensors:
        if entry.kind == "shared":
            continue
        pre_t = pre.load_float(entry.name)
        decoded, given = [], []
        for task, ckpt in zip(tasks, fts, strict=True):
            stats = _ErrorStats()
            tau = ckpt.load_float(entry.name) - pre_t
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
    check_order(tasks, finetuned, cross)
    for task, path in zip(tasks, finetuned, strict=True):
        check_distance(task, path, totals[task].err2, totals[task].ref2, archive.scheme)
    overall = _ErrorStats()
    for task in tasks:
        overall.merge(totals[task])
    return [{"name": t, **totals[t].as_dict()} for t in tasks], overall.as_dict(), rows


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
        report["tasks"] = tasks
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
                "parts": [
                    {
                        "role": p.role,
                        "bits": p.bits,
                        "group_size": p.group_size,
                        "range": p.range,
                        "scale_bits": p.scale_bits,
                        "codec": p.codec,
                    }
                    for p in t.parts
                ],
            }
            for t in archive.header.tensors
        ]
    return report
