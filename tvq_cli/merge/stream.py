"""The merge's inner loop: decode task vectors into reused buffers, work on them in blocks.

Why: every statistics pass and the merge itself decode all T task vectors of a tensor again, and
the original code gave each decode, each stacked copy and each step of a method a fresh
full-size tensor. On the target machine a fresh multi-megabyte tensor costs a page fault per
4 KiB (see docs/performance.md), and a [T, n] stack built from T separate decodes holds 2T
copies at once. Here the T task vectors are decoded in parallel straight into the rows of one
[T, n] buffer sized for the largest tensor and reused for every tensor; elementwise methods
then run on column blocks that stay in cache, in a pool of threads with torch's own intra-op
threads set to 1 (as in pack: OpenMP teams on contended cores made block-sized ops far slower).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..archive.format import TensorEntry
from ..archive.reader import Archive
from ..quant.groups import row_group_size
from ..quant.kernel import dequantize_into
from .sources import Sources

BLOCK = 1 << 16  # elements of one task per block: T blocks of 256 KiB of fp32 stay in cache


def column_blocks(n: int, size: int = BLOCK) -> list[slice]:
    """Consecutive slices covering range(n), each at most `size` long (at least one)."""
    return [slice(a, min(a + size, n)) for a in range(0, max(n, 1), size)]


class TaskVectorBuffer:
    """One [T, n] float32 buffer for the largest tensor, viewed at each tensor's size."""

    def __init__(self, tasks: int, largest: int):
        self.tasks = tasks
        self._data = torch.empty(tasks * max(largest, 1), dtype=torch.float32)

    def rows(self, numel: int) -> torch.Tensor:
        return self._data[: self.tasks * numel].view(self.tasks, numel)


def decode_into(sources: Sources, index: int, name: str, pre: torch.Tensor | None, row) -> None:
    """Task `index`'s fp32 task vector of tensor `name` into `row` (flat, numel elements)."""
    ref = sources.refs[index]
    task_vector_into(ref.archive, ref.task, name, pre, row)


def task_vector_into(
    archive: Archive, task: str, name: str, pre: torch.Tensor | None, row: torch.Tensor
) -> None:
    """One task's fp32 task vector of tensor `name` into `row` (flat, numel elements).

    A dense part that is the task vector itself (TVQ), made of whole groups, is dequantized in
    place (`dequantize_into`: the same ops as `dequantize`, so the same values); everything else
    (low-rate records included) goes through `Archive.task_vector`.
    """
    entry: TensorEntry = archive.entry(name)
    sole = archive.scheme.sole_role(task)
    part = None
    if sole is not None and entry.kind == "quantized" and entry.shape:
        part = next(p for p in entry.parts if p.role == sole)
    if part is not None and part.dense:
        cols = entry.shape[-1]
        size = row_group_size(part.group_size, cols)
        if size > 0 and cols % size == 0:
            q = archive.quantized(part, entry)
            spec = replace(part.spec, group_size=size)
            dequantize_into(q.codes.reshape(-1), spec, q.scales, q.zeros, row)
            return
    row.copy_(archive.task_vector(task, name, pre).reshape(-1))
