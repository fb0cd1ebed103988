"""The streaming core of a merge: task vectors decoded tensor by tensor, statistics passes,
and the merged values of one tensor.

Never more than one tensor's task vectors are held: every statistics pass and the merge itself
decode the T task vectors of a tensor again, kept as codes where they are one part's values and
made fp32 one cache-sized column block at a time (`stream.py`); a large tensor of an
elementwise method only a chunk of its rows at a time (`chunks.py`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from ..concurrency import WorkerPool
from ..dtypes import OUTPUT_DTYPES, itemsize
from ..quant.kernel import add_into
from ..tensors import not_finite, require_finite
from .chunks import Piece, TensorRows, plan
from .request import Merge
from .stream import (
    SPAN,
    BlockBuffers,
    CodeBuffers,
    TaskBlock,
    TaskVectorBuffer,
    TaskVectors,
    column_blocks,
    decode,
)


class Engine:
    """Decodes and merges the tensors of a checked merge."""

    def __init__(self, merge: Merge, progress: bool = False):
        self.merge = merge
        self.method = merge.method
        self.pre = merge.pretrained
        self.sources = merge.sources
        self.progress = progress
        self.buffer = TaskVectorBuffer(len(self.sources.tasks))
        self.codes = CodeBuffers(len(self.sources.tasks))
        self.blocks = BlockBuffers()
        self.runner = WorkerPool(merge.threads, "tvq-merge")
        self._rows: dict[str, TensorRows] = {}  # chunked tensors being decoded

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

    def decode(self, name: str, base: torch.Tensor | None) -> TaskVectors:
        """Every selected task's task vector of `name`, decoded in parallel (one task per
        worker): valid until the next call."""
        numel = self.pre.specs[name].numel

        def one(task: int):
            row = lambda: self.buffer.rows(numel)[task]  # noqa: E731 - made only where needed
            return decode(self.sources, task, name, base, row, self.codes)

        return TaskVectors(numel, self.runner.map(one, range(len(self.sources.tasks))), self.blocks)

    def pieces(self, name: str) -> list[Piece]:
        """Float tensor `name` whole, or in chunks of rows where it is large and the method
        takes them (`chunks.plan`)."""
        spec = self.pre.specs[name]
        dtype = self.merge.request.dtype
        out_itemsize = itemsize(OUTPUT_DTYPES[dtype] if dtype else spec.dtype)
        elementwise = self.method.elementwise and not self.method.per_task
        return plan(self.sources, name, spec, out_itemsize, elementwise)

    def decode_piece(self, piece: Piece, base: torch.Tensor | None) -> TaskVectors:
        """`decode` of a piece: a chunk's rows of every task vector, in the tensor's order
        (the first chunk starts reading its stored bytes, the last one checks their ends)."""
        if piece.rows is None:
            return self.decode(piece.name, base)
        if piece.rows.start == 0:
            rows = TensorRows(self.sources, piece.name, self.codes, self.buffer)
            self._rows[piece.name] = rows
        rows = self._rows[piece.name]
        if piece.last:
            del self._rows[piece.name]
        count = len(piece.rows)
        rows.advance(count)
        tasks = self.runner.map(lambda t: rows.task(t, count), range(len(rows.parts)))
        return TaskVectors(count * self.pre.specs[piece.name].shape[-1], tasks, self.blocks)

    def whole(self, name: str, taus: TaskVectors) -> torch.Tensor:
        """Every task vector of `name` whole, [T, *shape] in the shared buffer."""
        rows = taus.fill(self.buffer.rows(taus.numel))
        return rows.view(rows.shape[0], *self.pre.specs[name].shape)

    def tensors(self, desc: str) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor]]:
        """(name, pretrained fp32 or None when not needed, task vectors [T, ...]) for every
        float tensor, in order; the task vectors are valid until the next item."""
        with self.bar(desc) as bar:
            for name in self.merge.float_names:
                base = self.pre.load_float(name) if self.sources.needs_pretrained else None
                yield name, base, self.whole(name, self.decode(name, base))
                bar.update()

    def run_statistics(self) -> None:
        for index in range(self.method.stat_passes):
            if self.method.elementwise:
                with self.bar(f"statistics {index + 1}") as bar:
                    for name in self.merge.float_names:
                        base = self.pre.load_float(name) if self.sources.needs_pretrained else None
                        for piece in self.pieces(name):
                            self._observe_blocks(index, name, self.decode_piece(piece, base))
                        bar.update()
            else:
                for name, _, taus in self.tensors(f"statistics {index + 1}"):
                    self.method.observe(index, name, taus)
            self.method.end_pass(index)

    def _observe_blocks(self, index: int, name: str, taus: TaskVectors) -> None:
        self._each_block(taus.numel, lambda s: self.method.observe(index, name, TaskBlock(taus, s)))

    def _each_block(self, n: int, work: Callable[[slice], None]) -> None:
        """work(s) for every column block of n elements, in parallel, a span of blocks per
        item of the pool (one item per block made the pool's hand-offs a tenth of a merge)."""

        def span(s: slice) -> None:
            for block in column_blocks(s.stop, start=s.start):
                work(block)

        self.runner.map(span, column_blocks(n, SPAN))

    def pretrained_float(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        return require_finite(raw.to(torch.float32), self.pre.path, name)

    def merge_whole(self, name: str, raw: torch.Tensor, dtype: torch.dtype) -> list:
        """Merged weights of one tensor (one per target task for per-task methods)."""
        base = self.pretrained_float(name, raw)
        taus = self.whole(name, self.decode(name, base))
        merged = self.method.merge(name, taus)
        deltas = merged if isinstance(merged, list) else [merged]
        return [(base + delta).to(dtype) for delta in deltas]

    def merge_blocks(self, piece: Piece, raw: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """An elementwise method on column blocks of a piece (`raw`: its pretrained rows):
        the same values as on the whole tensor."""
        name = piece.name
        base_flat, out_flat = raw.reshape(-1), out.reshape(-1)
        pretrained = self.pretrained_float(name, raw) if self.sources.needs_pretrained else None
        taus = self.decode_piece(piece, pretrained)
        coded = taus.coded if self.method.merges_codes else None

        def block(s: slice) -> None:
            delta = self.method.merge(name, taus.block(s))
            if not add_into(base_flat[s], delta, out_flat[s]):
                raise not_finite(self.pre.path, name)

        def span(s: slice) -> None:  # straight from the codes, one native call per span
            if not self.method.merge_codes(name, coded, s.start, base_flat[s], out_flat[s]):
                raise not_finite(self.pre.path, name)

        if coded is not None:
            self.runner.map(span, column_blocks(taus.numel, SPAN))
        else:
            self._each_block(taus.numel, block)
        return out.view(raw.shape)
