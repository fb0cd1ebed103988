"""Pack's fast route: one quantized tensor in blocks of whole rows, in parallel.

Each block of every input is widened to fp32, its task vectors formed, and the scheme's
`encode` run on the block: each role's values are quantized and bit-packed into per-thread
buffers, in place in the part's stored tensors. Groups never cross rows and every step of the
quantizer (range search included) is per group, so a block's codes, scales and zero-points are
exactly those of the whole tensor (`whole.py`), whatever the block size or thread count.

Parts that hang on values taken from every group's range (compact scales: the grid's top step;
one min-max range per tensor: that range) need a first pass over the blocks for the ranges
alone. So the blocks are run in passes: in each pass a role whose ranges are not known yet only
records them, one whose ranges are known is coded, and one coded in an earlier pass gives back
its reconstruction (RTVQ's base, for error correction) from codes kept for that purpose. A role
that must reconstruct before its ranges are known ends the block's pass there (`_NotReady`).
zstd frames are compressed once a part's codes are complete.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..archive.format import Part, TensorEntry
from ..archive.parts import store_part
from ..archive.schemes import Scheme
from ..concurrency import WorkerPool
from ..quant import entropy, kernel, range_search
from ..quant.bitpack import pack_into, packed_nbytes
from ..quant.groups import row_group_size
from ..quant.spec import group_count
from ..tensors import not_finite
from .prefetch import TensorInputs

BLOCK_ELEMENTS = 1 << 19  # elements per block of rows (2 MiB fp32 buffers): fewer Python steps
Output = tuple[str, np.ndarray | memoryview | bytes]


def block_rows(cols: int) -> int:
    """Rows per block: about BLOCK_ELEMENTS elements, a multiple of 8 rows so that every
    block's packed codes start on a byte boundary."""
    return max(8, BLOCK_ELEMENTS // cols // 8 * 8)


def blockable(part: Part, cols: int) -> bool:
    """Whether blocks of rows code a part exactly as the whole tensor: groups that tile the
    rows (a group at least a row long is the row), or one min-max range per tensor (taken in
    a first pass). A searched per-tensor range needs the whole tensor's error for every
    candidate."""
    if part.group_size == 0:
        return part.range == "minmax"
    return cols % row_group_size(part.group_size, cols) == 0


def _two_pass(part: Part) -> bool:
    """Whether a part needs every group's range before any block is coded: compact scales
    (the grid's top is the tensor's largest step) and one range per tensor."""
    return part.scale_bits > 0 or part.group_size == 0


class _NotReady(Exception):
    """A role's reconstruction was asked for before its ranges are known: the rest of this
    block waits for the next pass."""


class _BlockInputs:
    """A block's task vectors (or fine-tuned weights). With one row of `rows` per task, each
    is widened once and kept, for schemes that read every task more than once (RTVQ: the mean,
    then the offsets); with one row, each is widened into it in turn. Values changed in place
    stay changed for a later iteration."""

    def __init__(
        self,
        name: str,
        sources: list[tuple[Path, torch.Tensor]],
        rows: torch.Tensor,
        minus: torch.Tensor | None,
    ):
        self.name, self.sources, self.rows, self.minus = name, sources, rows, minus
        self.widened = 0  # tasks kept in `rows` so far

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self) -> Iterator[torch.Tensor]:
        kept = self.rows.shape[0] > 1
        for task, (path, raw) in enumerate(self.sources):
            row = self.rows[task if kept else 0]
            if task >= self.widened:
                if not kernel.widen_into(raw, row.view(raw.shape), self.minus):
                    raise not_finite(path, self.name)
                self.widened = task + 1 if kept else 0
            yield row


class _Workspace:
    """One thread's reusable buffers for blocks of up to `size` elements."""

    def __init__(self, size: int, rows: int):
        padded = -(-size // 8) * 8
        self.size = size
        self.pre = torch.empty(size)
        self.x = torch.empty(rows * size)  # one row per task (coupled schemes), else one
        self.shared = torch.empty(size)  # a scheme's own values (RTVQ's base)
        self.anchor = torch.empty(size)  # a role's reconstruction
        self.codes = torch.zeros(padded, dtype=torch.uint8)
        self.packed = np.empty(padded, np.uint8)
        self.scratch = np.empty(padded // 8, np.uint64)


class _Parts:
    """The growing stored tensors of one quantized tensor: packed (or byte-aligned, for zstd)
    codes, scales or step codes, zero codes; for two-pass parts every group's range, gathered
    in a first pass; and the state of each part across passes."""

    def __init__(self, entry: TensorEntry):
        self.entry = entry
        self.cols = entry.shape[-1]
        # as coded: a group longer than a row is the row (the same groups and stored bytes)
        self.parts = [
            replace(p, group_size=row_group_size(p.group_size, self.cols)) for p in entry.parts
        ]
        parts = self.parts
        self.width = [
            entropy.SYMBOL_BITS[p.bits] if p.codec in entropy.CODED else p.bits for p in parts
        ]
        self.packed = [np.empty(packed_nbytes(entry.numel, w), np.uint8) for w in self.width]
        groups = [group_count(entry.shape, p.group_size) for p in parts]
        self.scales = [torch.empty(g) for g in groups]
        self.zeros = [torch.empty(g, dtype=torch.uint8) for g in groups]
        self.steps = [
            torch.empty(g, dtype=torch.uint8) if p.scale_bits else None
            for g, p in zip(groups, parts, strict=True)
        ]
        two_pass = [_two_pass(p) for p in parts]
        # ranges start empty (0, 0): a per-tensor range is the union of its blocks' ranges
        self.lo = [torch.zeros(g) if t else None for g, t in zip(groups, two_pass, strict=True)]
        self.hi = [torch.zeros(g) if t else None for g, t in zip(groups, two_pass, strict=True)]
        self.grid = [(1.0, 1.0)] * len(parts)  # (fallback, top) of range_search.grid_top
        self.ready = [not t for t in two_pass]  # ranges known: the part can be coded
        self.done = [False] * len(parts)  # coded in an earlier pass
        self.kept: list[torch.Tensor | None] = [None] * len(parts)  # codes, for reconstruction
        self.ranged: set[int] = set()  # parts whose ranges were recorded in this pass
        self.coded: set[int] = set()  # parts coded in this pass
        self.more_passes = False  # whether a pass follows this one
        self._lock = threading.Lock()

    def groups(self, index: int, first: int, count: int) -> slice:
        """The groups of part `index` in the block of `count` elements from row `first`."""
        size = self.parts[index].group_size
        if size == 0:
            return slice(0, 1)
        start = first * (self.cols // size)
        return slice(start, start + count // size)

    def ranges(self, index: int, x: torch.Tensor, first: int) -> None:
        """Record the range of every group of block `x` of part `index`."""
        size = self.parts[index].group_size
        lo, hi = range_search.group_ranges(x.reshape(-1, size) if size else x.reshape(1, -1))
        if size:
            groups = self.groups(index, first, x.numel())
            self.lo[index][groups] = lo
            self.hi[index][groups] = hi
        else:
            with self._lock:  # blocks of one per-tensor range, in any order: min, max commute
                torch.minimum(self.lo[index], lo, out=self.lo[index])
                torch.maximum(self.hi[index], hi, out=self.hi[index])
        with self._lock:
            self.ranged.add(index)

    def start_pass(self) -> None:
        self.ranged, self.coded = set(), set()
        self.more_passes = not all(r or d for r, d in zip(self.ready, self.done, strict=True))

    def end_pass(self) -> None:
        for i in self.ranged:
            self.grid[i] = range_search.grid_top(self.lo[i], self.hi[i], self.parts[i].spec)
            self.ready[i] = True
        for i in self.coded:
            self.done[i] = True

    def kept_codes(self, index: int) -> torch.Tensor:
        """Part `index`'s codes, kept for a later pass's reconstruction."""
        with self._lock:
            if self.kept[index] is None:
                self.kept[index] = torch.empty(self.entry.numel, dtype=torch.uint8)
            self.coded.add(index)
            return self.kept[index]

    def mark_coded(self, index: int) -> None:
        with self._lock:
            self.coded.add(index)

    def stored(self, index: int, codes: np.ndarray | bytes) -> list[Output]:
        steps = self.steps[index]
        return store_part(
            self.entry.parts[index],
            self.entry.name,
            codes,
            self.scales[index].numpy(),
            self.zeros[index].numpy(),
            None if steps is None else steps.numpy(),
            self.grid[index][1],
        )


class BlockedRoute:
    """Codes whole quantized tensors in blocks of rows on a pool of `threads` workers."""

    def __init__(
        self,
        scheme: Scheme,
        error_correction: bool,
        pretrained: Path,
        finetuned: list[Path],
        threads: int,
    ):
        self.scheme = scheme
        self.error_correction = error_correction
        self.pretrained = pretrained
        self.finetuned = finetuned
        self._pool = WorkerPool(threads, "tvq-quant")
        self._local = threading.local()

    def close(self) -> None:
        self._pool.close()

    def outputs(self, inputs: TensorInputs) -> list[Output]:
        entry = inputs.entry
        parts = _Parts(entry)
        rows = entry.numel // parts.cols
        step = block_rows(parts.cols)
        while not all(parts.done):
            parts.start_pass()

            def block(first: int) -> None:
                self._block(inputs, parts, first, min(rows, first + step), step * parts.cols)

            self._pool.map(block, range(0, rows, step))
            parts.end_pass()
        return self._stored(parts)

    def _stored(self, parts: _Parts) -> list[Output]:
        """Every part's stored tensors; zstd frames of the parts are compressed in parallel."""
        entry = parts.entry
        codes: list[np.ndarray | bytes] = list(parts.packed)

        def compress(i: int) -> None:
            codes[i] = entropy.compress(parts.packed[i], entry.parts[i].codec)

        coded = [i for i, p in enumerate(entry.parts) if p.codec in entropy.CODED]
        self._pool.map(compress, coded)
        out: list[Output] = []
        for i in range(len(entry.parts)):
            out += parts.stored(i, codes[i])
        return out

    def _workspace(self, size: int) -> _Workspace:
        ws = getattr(self._local, "ws", None)
        if ws is None or ws.size < size:
            rows = len(self.finetuned) if self.scheme.coupled else 1
            ws = self._local.ws = _Workspace(size, rows)
        return ws

    def _block(self, inputs: TensorInputs, parts: _Parts, first: int, end: int, size: int) -> None:
        """One pass over one block of rows."""
        name, cols = inputs.entry.name, parts.cols
        ws = self._workspace(size)
        count = (end - first) * cols
        pre = ws.pre[:count].view(-1, cols)
        if not kernel.widen_into(inputs.pretrained.view(-1, cols)[first:end], pre):
            raise not_finite(self.pretrained, name)
        sources = [
            (path, raw.view(-1, cols)[first:end])
            for path, raw in zip(self.finetuned, inputs.finetuned, strict=True)
        ]
        minus = pre if self.scheme.subtracts_pretrained else None
        tasks = len(sources) if self.scheme.coupled else 1
        rows = ws.x[: tasks * count].view(tasks, count)
        block = _BlockInputs(name, sources, rows, minus)

        def code(index: int, values: torch.Tensor, reconstruct: bool = False):
            return _code(ws, parts, index, values, first, reconstruct)

        with contextlib.suppress(_NotReady):  # the rest of the block waits for the next pass
            self.scheme.encode(block, code, self.error_correction, ws.shared[:count])


def _code(
    ws: _Workspace,
    parts: _Parts,
    index: int,
    values: torch.Tensor,
    first: int,
    reconstruct: bool,
) -> torch.Tensor | None:
    """The block's part of role `index` in this pass: record its ranges, code it, or give
    back its reconstruction if it was coded in an earlier pass."""
    count = values.numel()
    anchor = ws.anchor[:count]
    if parts.done[index]:
        if not reconstruct:
            return None
        offset = first * parts.cols
        groups = parts.groups(index, first, count)
        kernel.dequantize_into(
            parts.kept[index][offset : offset + count],
            parts.parts[index].spec,
            parts.scales[index][groups],
            parts.zeros[index][groups],
            anchor,
        )
        return anchor
    if not parts.ready[index]:
        parts.ranges(index, values, first)
        if reconstruct:
            raise _NotReady
        return None
    _emit(ws, parts, index, values, first, anchor if reconstruct else None)
    return anchor if reconstruct else None


def _emit(
    ws: _Workspace,
    parts: _Parts,
    index: int,
    x: torch.Tensor,
    first: int,
    anchor: torch.Tensor | None = None,
) -> None:
    """Quantize block `x` of part `index` into its place; optionally dequantize it to
    `anchor` before the codes are packed (and keep the codes if a later pass needs it)."""
    part = parts.parts[index]
    count = x.numel()
    groups = parts.groups(index, first, count)
    scales, zeros = parts.scales[index][groups], parts.zeros[index][groups]
    codes = ws.codes[:count]
    size = part.group_size
    grouped = x.reshape(-1, size) if size else x.reshape(1, -1)
    if parts.lo[index] is not None:  # two-pass part: ranges from the first pass
        lo, hi = parts.lo[index][groups], parts.hi[index][groups]
    else:
        lo, hi = range_search.group_ranges(grouped)
    fallback, top = parts.grid[index]
    q = range_search.quantize_groups(grouped, lo, hi, part.spec, fallback, top)
    codes.copy_(q.codes.view(-1))
    scales.copy_(q.scales)
    zeros.copy_(q.zeros)
    if q.step_codes is not None:
        parts.steps[index][groups] = q.step_codes
    if anchor is not None:
        kernel.dequantize_into(codes, part.spec, scales, zeros, anchor)
        if parts.more_passes:
            offset = first * parts.cols
            parts.kept_codes(index)[offset : offset + count] = codes
    parts.mark_coded(index)
    if part.codec == "zstd-c":  # stored centered on the zero-points (quant/entropy.py)
        shape = (count // parts.cols, parts.cols)
        codes.copy_(
            torch.from_numpy(entropy.center(codes.numpy(), zeros.numpy(), shape, size, part.bits))
        )
    padded = -(-count // 8) * 8
    ws.codes[count:padded] = 0
    width = parts.width[index]
    packed = ws.packed[: padded * width // 8]
    pack_into(ws.codes[:padded].numpy(), width, packed, ws.scratch)
    start, size = first * parts.cols * width // 8, packed_nbytes(count, width)
    parts.packed[index][start : start + size] = packed[:size]
