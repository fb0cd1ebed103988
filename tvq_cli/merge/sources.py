"""The task vectors to merge: one or more archives, checked against the pretrained model.

Archives are merged together only when they were packed against the same pretrained model
(same fingerprint) and describe the same tensors. Task vectors are produced one tensor at a
time, stacked over tasks, so at most T copies of one tensor are in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..archive.format import Part, TensorEntry
from ..archive.reader import Archive
from ..errors import TvqError, UsageError
from ..io.checkpoint import Checkpoint
from ..io.compat import check_pretrained
from ..quant.groups import expand_groups


@dataclass(frozen=True)
class TaskRef:
    """One task of one archive."""

    archive: Archive
    task: str

    def own_part(self, entry: TensorEntry) -> Part | None:
        """The quantized part that carries this task's own error (None for exact tensors).

        RTVQ: the task's offset; the base is shared by every task, so its error does not
        separate them.
        """
        if entry.kind != "quantized":
            return None
        role = self.archive.scheme.task_role(self.task)
        return next(p for p in entry.parts if p.role == role)


def parse_task_list(text: str | None) -> list[str] | None:
    """`a,b,c` into names (None when not given); empty entries and duplicates are errors."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise UsageError(f"--tasks expects names separated by commas, got {text!r}")
    if len(set(names)) != len(names):
        raise UsageError(f"--tasks names a task twice: {text!r}")
    return names


class Sources:
    """Selected tasks across archives, all checked against one pretrained checkpoint."""

    def __init__(
        self,
        archives: list[Path | str],
        pretrained: Checkpoint,
        tasks: list[str] | None = None,
        allow_different_base: bool = False,
    ):
        if not archives:
            raise UsageError("give at least one archive to merge")
        self.pretrained = pretrained
        check_pretrained(pretrained)
        opened = [Archive(p) for p in archives]
        self.allow_different_base = allow_different_base
        self.fingerprint: str | None = None  # set by check_fingerprint
        self.mismatched: list[str] = []
        for archive in opened:
            archive.check_model(pretrained)
        available: dict[str, TaskRef] = {}
        for archive in opened:
            for task in archive.tasks:
                if task in available:
                    raise TvqError(
                        f"task {task!r} is in both {available[task].archive.path} and "
                        f"{archive.path}: task names must be unique across archives"
                    )
                available[task] = TaskRef(archive, task)
        if tasks is None:
            tasks = list(available)
        unknown = [t for t in tasks if t not in available]
        if unknown:
            raise UsageError(
                f"no task named {unknown[0]!r} in the archives (they hold {', '.join(available)})"
            )
        if not tasks:
            raise UsageError("no tasks selected")
        self.refs = [available[t] for t in tasks]
        self.archives = opened

    def check_fingerprint(self, fingerprint: str) -> None:
        """Compare the pretrained model's fingerprint (`Checkpoint.fingerprint`, or the same
        digests gathered while a merge reads it) with every archive's; a mismatch is an error
        unless allowed (--allow-different-base), then it is reported."""
        self.fingerprint = fingerprint
        self.mismatched = []
        for archive in self.archives:
            if archive.header.pretrained_fingerprint != fingerprint:
                if not self.allow_different_base:
                    raise TvqError(
                        f"{archive.path}: was packed against a different pretrained model than "
                        f"{self.pretrained.path} (fingerprints differ); use "
                        "--allow-different-base to merge anyway"
                    )
                self.mismatched.append(str(archive.path))

    @property
    def tasks(self) -> list[str]:
        return [r.task for r in self.refs]

    @property
    def left_out_rows(self) -> list[dict]:
        """Rows tasks added past the pretrained tensors (new tokens): a merged model keeps the
        pretrained vocabulary, so these are not in it (docs/merge.md, "Added tokens")."""
        return [
            {"task": ref.task, "tensor": name, "rows": rows}
            for ref in self.refs
            for name, rows in ref.archive.info(ref.task).rows.items()
        ]

    @property
    def needs_pretrained(self) -> bool:
        """FQ archives store fine-tuned weights: forming their task vectors takes the
        pretrained tensor; TVQ and RTVQ task vectors do not."""
        return any(not r.archive.scheme.subtracts_pretrained for r in self.refs)

    def steps(self, name: str) -> list[torch.Tensor | None]:
        """Per element quantization step of each task's own part (None where stored exact)."""
        steps: list[torch.Tensor | None] = []
        for ref in self.refs:
            entry = ref.archive.entry(name)
            part = ref.own_part(entry)
            if part is None:
                steps.append(None)
                continue
            if not part.dense:  # one step per tensor, the record's gain included
                step = ref.archive.record(part, entry).step
                steps.append(torch.full(entry.shape, step, dtype=torch.float32))
                continue
            q = ref.archive.quantized(part, entry)
            steps.append(expand_groups(1.0 / q.scales, entry.shape, part.group_size))
        return steps
