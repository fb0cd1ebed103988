"""The merge's inner loop: one tensor's task vectors, decoded block by block into reused buffers.

Why: every statistics pass and the merge itself go over all T task vectors of a tensor again, and
the original code gave each decode, each stacked copy and each step of a method a fresh
full-size tensor. On the target machine a fresh multi-megabyte tensor costs a page fault per
4 KiB (see docs/performance.md). Here a task vector that is one part's dequantized values
(TVQ) stays as its codes, scales and zero-points; its fp32 values are made only for one column
block at a time, straight into the rows of a cache-sized [T, block] buffer of the thread that
works on the block (`quant.kernel.dequantize_span`: the same divisions as `dequantize`).
Other task vectors (RTVQ's base plus offset, FQ's weights less the pretrained ones, exact
deltas) are decoded whole into the rows of one [T, n] buffer sized for the largest tensor, made
on first use and reused for every tensor. Elementwise methods run on column blocks in a pool of
threads with torch's own intra-op threads set to 1 (as in pack: OpenMP teams on contended
cores made block-sized ops far slower).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from ..archive.format import Part, TensorEntry, part_keys
from ..archive.parts import decode_part
from ..archive.reader import Archive
from ..quant.groups import row_group_size
from ..quant.kernel import CodedTasks, count_magnitudes, dequantize_into, dequantize_span
from ..quant.spec import Quantized, QuantSpec
from .sources import Sources

BLOCK = 1 << 16  # elements of one task per block: T blocks of 256 KiB of fp32 stay in cache
SPAN = 1 << 20  # elements per work item of the thread pool: a few hand-offs per tensor


def column_blocks(n: int, size: int = BLOCK, start: int = 0) -> list[slice]:
    """Consecutive slices covering range(start, n), each at most `size` long (at least one)."""
    return [slice(a, min(a + size, n)) for a in range(start, max(n, start + 1), size)]


class TaskVectorBuffer:
    """One [T, n] float32 buffer viewed at each tensor's size, grown to the largest tensor
    asked for (merges of TVQ archives by blocks never need it). Not sized for the model's
    largest tensor up front: a small tensor stored exact would have reserved T x the largest
    (at T = 50 with a 128256 x 4096 embedding, 105 GB of address space, refused)."""

    def __init__(self, tasks: int):
        self.tasks = tasks
        self._data = torch.empty(0)
        self._lock = threading.Lock()  # tasks are decoded in parallel

    def rows(self, numel: int) -> torch.Tensor:
        """[T, numel] views; every caller of one tensor's decode asks for the same numel."""
        with self._lock:
            if self._data.numel() < self.tasks * numel:
                self._data = torch.empty(self.tasks * numel, dtype=torch.float32)
            data = self._data
        return data[: self.tasks * numel].view(self.tasks, numel)


class CodedVector:
    """A task vector kept as one part's codes, scales and zero-points (groups tile the rows)."""

    def __init__(self, q: Quantized, spec: QuantSpec):
        self.codes = q.codes.reshape(-1)
        self.scales, self.zeros, self.spec = q.scales, q.zeros, spec

    def span(self, s: slice, out: torch.Tensor) -> None:
        dequantize_span(self.codes[s], s.start, self.spec, self.scales, self.zeros, out)

    def count(self, s: slice, bin: int, counts: np.ndarray) -> bool:
        codes, spec = self.codes[s], self.spec
        return count_magnitudes(codes, s.start, spec, self.scales, self.zeros, bin, counts)


class TaskColumns:
    """Columns of one task vector, for top-k histograms: counted from its codes where it is
    kept as codes (a group's 2^bits values, each counted once), else from its values."""

    def __init__(self, block: TaskBlock, task: int):
        self.block, self.task = block, task

    def numel(self) -> int:
        return self.block.s.stop - self.block.s.start

    def values(self) -> torch.Tensor:
        return self.block.values[self.task]

    def count_magnitudes(self, bin: int, counts: np.ndarray) -> bool:
        """See `quant.kernel.count_magnitudes`; False where it cannot (use `values`)."""
        source = self.block.taus.sources[self.task]
        return isinstance(source, CodedVector) and source.count(self.block.s, bin, counts)


class TaskBlock:
    """Columns `s` of every task vector of one tensor, as statistics passes see them: their
    fp32 values ([T, len(s)], made on first use, in this thread's buffer) or one task's
    columns (`block[t]`, `iter(block)`)."""

    def __init__(self, taus: TaskVectors, s: slice):
        self.taus, self.s = taus, s
        self._values: torch.Tensor | None = None

    @property
    def coded(self) -> CodedTasks | None:
        """Every task vector's codes (whole tensor), when all are kept as codes."""
        return self.taus.coded

    @property
    def values(self) -> torch.Tensor:
        if self._values is None:
            self._values = self.taus.block(self.s)
        return self._values

    def __len__(self) -> int:
        return len(self.taus)

    def __getitem__(self, task: int) -> TaskColumns:
        return TaskColumns(self, task)

    def __iter__(self):
        return (TaskColumns(self, t) for t in range(len(self)))


class BlockBuffers(threading.local):
    """Each thread's [T, block] fp32 buffer, kept across tensors and passes."""

    def get(self, tasks: int, size: int) -> torch.Tensor:
        buffer = getattr(self, "buffer", None)
        if buffer is None or buffer.numel() < tasks * size:
            buffer = self.buffer = torch.empty(tasks * max(size, BLOCK))
        return buffer[: tasks * size].view(tasks, size)


class TaskVectors:
    """The T task vectors of one tensor: column blocks of them on demand, or all of them."""

    def __init__(
        self, numel: int, sources: list[CodedVector | torch.Tensor], buffers: BlockBuffers
    ):
        self.numel = numel
        self.sources = sources  # per task: its codes, or its decoded fp32 row
        self.buffers = buffers

    def __len__(self) -> int:
        return len(self.sources)

    def block(self, s: slice) -> torch.Tensor:
        """Columns `s` of every task vector, [T, len(s)] fp32 in this thread's buffer: valid
        until this thread's next call."""
        rows = self.buffers.get(len(self), s.stop - s.start)
        for row, source in zip(rows, self.sources, strict=True):
            if isinstance(source, CodedVector):
                source.span(s, row)
            else:
                row.copy_(source[s])
        return rows

    @functools.cached_property
    def coded(self) -> CodedTasks | None:
        """Every task vector's codes, when all are kept as codes."""
        if not all(isinstance(s, CodedVector) for s in self.sources):
            return None
        return CodedTasks([(s.codes, s.spec, s.scales, s.zeros) for s in self.sources])

    def fill(self, rows: torch.Tensor) -> torch.Tensor:
        """Every task vector whole, in `rows` ([T, numel], where decoded rows already are)."""
        whole = slice(0, self.numel)
        for row, source in zip(rows, self.sources, strict=True):
            if isinstance(source, CodedVector):
                source.span(whole, row)
        return rows


class CodeBuffers:
    """Reused uint8 buffers per task for its codes of a tensor (or of a chunk of its rows,
    `chunks`) and for their stored bytes, each grown to the largest asked for: decoding into
    fresh arrays cost more in page faults than the decoding itself (measured). Each task is
    decoded by one thread at a time."""

    def __init__(self, tasks: int):
        self._codes: list[np.ndarray] = [np.empty(0, np.uint8)] * tasks
        self._stored: list[np.ndarray] = [np.empty(0, np.uint8)] * tasks

    def codes(self, task: int, count: int) -> np.ndarray:
        """A buffer for `count` codes (rounded up to 8, as `unpack_bits` takes)."""
        size = -(-max(count, 1) // 8) * 8
        if self._codes[task].size < size:
            self._codes[task] = np.empty(size, np.uint8)
        return self._codes[task]

    def stored(self, task: int, size: int) -> np.ndarray:
        if self._stored[task].size < size:
            self._stored[task] = np.empty(size, np.uint8)
        return self._stored[task]


def sole_part(archive: Archive, task: str, name: str) -> tuple[TensorEntry, Part, QuantSpec] | None:
    """The part that is `task`'s task vector of tensor `name` itself (TVQ) when its groups tile
    the rows (a group longer than a row is the row), with the spec of those groups; None where
    the task vector is built from more (RTVQ, FQ), stored exact or as a low-rate record."""
    entry: TensorEntry = archive.entry(name)
    sole = archive.scheme.sole_role(task)
    if sole is None or entry.kind != "quantized" or not entry.shape:
        return None
    part = next(p for p in entry.parts if p.role == sole)
    if not part.dense:
        return None
    cols = entry.shape[-1]
    size = row_group_size(part.group_size, cols)
    if size == 0 or cols % size:
        return None
    return entry, part, replace(part.spec, group_size=size)


def decode(
    sources: Sources,
    index: int,
    name: str,
    pre: torch.Tensor | None,
    row: Callable[[], torch.Tensor],
    codes: CodeBuffers,
) -> CodedVector | torch.Tensor:
    """Task `index`'s task vector of tensor `name`: its codes (in `codes`' buffer of the task)
    when it is one part of whole groups (TVQ), else its fp32 values decoded into `row()`
    (flat, numel elements). Either is valid until the task's next decode."""
    ref = sources.refs[index]
    archive = ref.archive
    sole = sole_part(archive, ref.task, name)
    if sole is not None:
        entry, part, spec = sole
        codes_key = part_keys(part, name)[0]

        def raw(key: str) -> np.ndarray:
            if key != codes_key:
                return archive.raw(key)
            return archive.raw(key, codes.stored(index, archive.nbytes(key)))

        q = decode_part(part, entry, raw, str(archive.path), codes.codes(index, entry.numel))
        return CodedVector(q, spec)
    values = row()
    values.copy_(archive.task_vector(ref.task, name, pre).reshape(-1))
    return values


def task_vector_into(
    archive: Archive, task: str, name: str, pre: torch.Tensor | None, row: torch.Tensor
) -> None:
    """One task's fp32 task vector of tensor `name` into `row` (flat, numel elements): a sole
    part of whole groups dequantized in place (`dequantize_into`: the same ops as
    `dequantize`, so the same values), everything else through `Archive.task_vector`."""
    sole = sole_part(archive, task, name)
    if sole is None:
        row.copy_(archive.task_vector(task, name, pre).reshape(-1))
        return
    entry, part, spec = sole
    q = archive.quantized(part, entry)
    dequantize_into(q.codes.reshape(-1), spec, q.scales, q.zeros, row)
