"""The streaming core of a merge: task vectors decoded tensor by tensor, statistics passes,
and the merged values of one tensor.

Never more than one tensor's task vectors are held: every statistics pass and the merge itself
decode the T task vectors of a tensor into one reused buffer (`stream.py`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from tqdm import tqdm

from ..concurrency import WorkerPool
from ..tensors import require_finite
from .request import Merge
from .stream import TaskVectorBuffer, column_blocks, decode_into


class Engine:
    """Decodes and merges the tensors of a checked merge."""

    def __init__(self, merge: Merge, progress: bool = False):
        self.merge = merge
        self.method = merge.method
        self.pre = merge.pretrained
        self.sources = merge.sources
        self.progress = progress
        names = merge.float_names
        largest = max((self.pre.specs[n].numel for n in names), default=1)
        self.buffer = TaskVectorBuffer(len(self.sources.tasks), largest)
        self.runner = WorkerPool(merge.threads, "tvq-merge")

    def close(self) -> None:
        self.runner.close()

    def bar(self, desc: str) -> tqdm:
        return tqdm(
            total=len(self.merge.float_names),
            desc=desc,
            unit="tensor",
            disable=not self.progress,
            file=sys.stderr,
        )

    def decode(self, name: str, base: torch.Tensor | None) -> torch.Tensor:
        """Every selected task's fp32 task vector of `name`, decoded in parallel into the
        shared buffer: [T, numel], valid until the next call."""
        rows = self.buffer.rows(self.pre.specs[name].numel)
        self.runner.map(
            lambda t: decode_into(self.sources, t, name, base, rows[t]), list(range(len(rows)))
        )
        return rows

    def stacked(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(rows.shape[0], *self.pre.specs[name].shape)

    def tensors(self, desc: str) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor]]:
        """(name, pretrained fp32 or None when not needed, task vectors [T, ...]) for every
        float tensor, in order; the task vectors are valid until the next item."""
        with self.bar(desc) as bar:
            for name in self.merge.float_names:
                base = self.pre.load_float(name) if self.sources.needs_pretrained else None
                yield name, base, self.stacked(name, self.decode(name, base))
                bar.update()

    def run_statistics(self) -> None:
        blocked = self.method.elementwise
        for index in range(self.method.stat_passes):
            for name, _, taus in self.tensors(f"statistics {index + 1}"):
                if blocked:
                    self._observe_blocks(index, name, taus.view(taus.shape[0], -1))
                else:
                    self.method.observe(index, name, taus)
            self.method.end_pass(index)

    def _observe_blocks(self, index: int, name: str, flat: torch.Tensor) -> None:
        self.runner.map(
            lambda s: self.method.observe(index, name, flat[:, s]), column_blocks(flat.shape[1])
        )

    def pretrained_float(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        return require_finite(raw.to(torch.float32), self.pre.path, name)

    def merge_whole(self, name: str, raw: torch.Tensor, dtype: torch.dtype) -> list:
        """Merged weights of one tensor (one per target task for per-task methods)."""
        base = self.pretrained_float(name, raw)
        taus = self.stacked(name, self.decode(name, base))
        merged = self.method.merge(name, taus)
        deltas = merged if isinstance(merged, list) else [merged]
        return [(base + delta).to(dtype) for delta in deltas]

    def merge_blocks(self, name: str, raw: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """An elementwise method on column blocks: the same values as on the whole tensor."""
        base_flat = raw.reshape(-1)
        pretrained = self.pretrained_float(name, raw) if self.sources.needs_pretrained else None
        taus = self.decode(name, pretrained)

        def block(s: slice) -> None:
            base = self.pretrained_float(name, base_flat[s])
            out[s] = base.add_(self.method.merge(name, taus[:, s]))

        self.runner.map(block, column_blocks(taus.shape[1]))
        return out.view(raw.shape)
