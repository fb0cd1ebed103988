"""Pack's fast route: one quantized tensor in blocks of whole rows, in parallel.

For direct schemes (TVQ, FQ: role i codes input i as it is) each role of a block is coded
straight from the raw inputs by one native pass (`kernel.BlockCoder`: widen, subtract the
pretrained block, range-search, quantize and bit-pack into the part's stored bytes, an
L1-sized chunk of groups at a time). Other schemes (RTVQ) get each block of every input
widened to fp32 and run the scheme's `encode` on it; each role's values are coded the same
way from there. Groups never cross rows and every step of the
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
from ..io.buffers import BufferPool
from ..quant import entropy, kernel, range_search
from ..quant.groups import row_group_size
from ..quant.sizes import CODED, SYMBOL_BITS, packed_nbytes
from ..quant.spec import group_count
from ..tensors import not_finite
from .prefetch import TensorInputs

BLOCK_ELEMENTS = 1 << 19  # elements per block of rows (2 MiB fp32 buffers): fewer Python steps
StoredBytes = np.ndarray | memoryview | bytes
Output = tuple[str, StoredBytes]


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


def code_width(part: Part) -> int:
    """Bits per code as packed: byte-aligned symbols where zstd compresses them."""
    return SYMBOL_BITS[part.bits] if part.codec in CODED else part.bits


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
        self.size = size
        self.pre = torch.empty(size)
        self.x = torch.empty(rows * size)  # one row per task (coupled schemes), else one
        self.shared = torch.empty(size)  # a scheme's own values (RTVQ's base)
        self.anchor = torch.empty(size)  # a role's reconstruction
        self.work = torch.empty(size)  # the coder's widened values
        self.codes = torch.zeros(-(-size // 8) * 8, dtype=torch.uint8)
        self.lo = torch.empty(0)  # ranges of single-pass parts' groups
        self.hi = torch.empty(0)

    def ranges(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo.numel() < groups:
            self.lo, self.hi = torch.empty(groups), torch.empty(groups)
        return self.lo[:groups], self.hi[:groups]


class _Parts:
    """The growing stored tensors of one quantized tensor: packed (or byte-aligned, for zstd)
    codes, scales or step codes, zero codes; for two-pass parts every group's range, gathered
    in a first pass; and the state of each part across passes. A part's buffers are made when
    it is opened (`open`): all at once for the blocked route, one role at a time for a tensor
    read by rows (`rows.py`), which closes each once it is stored."""

    def __init__(self, entry: TensorEntry, spare: BufferPool, opened: bool = True):
        self.entry = entry
        self.spare = spare
        self.cols = entry.shape[-1]
        # as coded: a group longer than a row is the row (the same groups and stored bytes)
        self.parts = [
            replace(p, group_size=row_group_size(p.group_size, self.cols)) for p in entry.parts
        ]
        parts = self.parts
        count = len(parts)
        self.width = [code_width(p) for p in parts]
        self.packed: list[np.ndarray | None] = [None] * count
        self.scales: list[torch.Tensor | None] = [None] * count
        self.zeros: list[torch.Tensor | None] = [None] * count
        self.steps: list[torch.Tensor | None] = [None] * count
        self.lo: list[torch.Tensor | None] = [None] * count
        self.hi: list[torch.Tensor | None] = [None] * count
        two_pass = [_two_pass(p) for p in parts]
        self.coders = [
            None if t else kernel.BlockCoder(p.spec, 1.0, 1.0, w, p.codec == "zstd-c")
            for p, t, w in zip(parts, two_pass, self.width, strict=True)
        ]  # per part, once its grid_top (fallback, top) is known
        self.ready = [not t for t in two_pass]  # ranges known: the part can be coded
        self.done = [False] * count  # coded in an earlier pass
        self.kept: list[torch.Tensor | None] = [None] * count  # codes, for reconstruction
        self.keep: set[int] = set()  # parts whose codes are kept whatever the passes to come
        self.ranged: set[int] = set()  # parts whose ranges were recorded in this pass
        self.coded: set[int] = set()  # parts coded in this pass
        self.more_passes = False  # whether a pass follows this one
        self._lock = threading.Lock()
        for index in range(count) if opened else ():
            self.open(index)

    def open(self, index: int) -> None:
        """Make part `index`'s buffers."""
        part = self.parts[index]
        coded = part.codec in CODED
        nbytes = packed_nbytes(self.entry.numel, self.width[index])
        self.packed[index] = _packed_buffer(self.spare if coded else None, nbytes)
        groups = group_count(self.entry.shape, part.group_size)
        self.scales[index] = torch.empty(groups)
        self.zeros[index] = torch.empty(groups, dtype=torch.uint8)
        self.steps[index] = torch.empty(groups, dtype=torch.uint8) if part.scale_bits else None
        if _two_pass(part):
            # ranges start empty (0, 0): a per-tensor range is the union of its blocks' ranges
            self.lo[index], self.hi[index] = torch.zeros(groups), torch.zeros(groups)

    def close(self, index: int) -> None:
        """Drop part `index`'s buffers once stored; a kept part keeps what reconstructs it
        (codes, scales, zero codes) for later roles."""
        self.packed[index] = self.steps[index] = self.lo[index] = self.hi[index] = None
        if index not in self.keep:
            self.scales[index] = self.zeros[index] = None

    def groups(self, index: int, first: int, count: int) -> slice:
        """The groups of part `index` in the block of `count` elements from row `first`."""
        size = self.parts[index].group_size
        if size == 0:
            return slice(0, 1)
        start = first * (self.cols // size)
        return slice(start, start + count // size)

    def width_of(self, index: int, count: int) -> int:
        """Values per group of part `index` in a block of `count` elements."""
        return self.parts[index].group_size or count

    def ranges(
        self,
        index: int,
        raw: torch.Tensor,
        minus: torch.Tensor | None,
        first: int,
        ws: _Workspace,
    ) -> bool:
        """Record the range of every group of the block ``raw - minus`` of part `index`;
        returns whether every value is finite."""
        count = raw.numel()
        if self.parts[index].group_size:
            groups = self.groups(index, first, count)
            lo, hi = self.lo[index][groups], self.hi[index][groups]
            finite = kernel.ranges_into(raw, minus, self.width_of(index, count), lo, hi, ws.work)
        else:
            lo, hi = ws.ranges(1)
            finite = kernel.ranges_into(raw, minus, count, lo, hi, ws.work)
            with self._lock:  # blocks of one per-tensor range, in any order: min, max commute
                torch.minimum(self.lo[index], lo, out=self.lo[index])
                torch.maximum(self.hi[index], hi, out=self.hi[index])
        with self._lock:
            self.ranged.add(index)
        return finite

    def start_pass(self, active: list[int] | None = None) -> None:
        """A pass over the blocks of the parts `active` (default: every part)."""
        self.ranged, self.coded = set(), set()
        active = range(len(self.parts)) if active is None else active
        self.more_passes = not all(self.ready[i] or self.done[i] for i in active)

    def end_pass(self) -> None:
        for i in self.ranged:
            spec = self.parts[i].spec
            fallback, top = range_search.grid_top(self.lo[i], self.hi[i], spec)
            centered = self.parts[i].codec == "zstd-c"
            self.coders[i] = kernel.BlockCoder(spec, fallback, top, self.width[i], centered)
            self.ready[i] = True
        for i in self.coded:
            self.done[i] = True

    def keep_codes(self, index: int, first: int, codes: torch.Tensor) -> None:
        """Keep a block's codes (from row `first`) of part `index` for a later pass's
        reconstruction: two to a byte where they fit in 4 bits (a kept part holds the whole
        tensor's codes; RTVQ's base in `rows.py` for every task). Blocks start on a multiple
        of 8 rows, so no byte is shared by two blocks."""
        nibbles = self.parts[index].bits <= 4
        with self._lock:
            if self.kept[index] is None:
                numel = self.entry.numel
                size = (numel + 1) // 2 if nibbles else numel
                self.kept[index] = torch.empty(size, dtype=torch.uint8)
            self.coded.add(index)
        kept, offset, count = self.kept[index], first * self.cols, codes.numel()
        if not nibbles:
            kept[offset : offset + count] = codes
            return
        start = offset // 2
        kept[start : start + (count + 1) // 2] = codes[0::2]
        kept[start : start + count // 2] |= codes[1::2] << 4

    def kept_block(self, index: int, first: int, count: int, scratch: torch.Tensor):
        """The kept codes of `count` values from row `first` (unpacked into `scratch`)."""
        kept, offset = self.kept[index], first * self.cols
        if self.parts[index].bits > 4:
            return kept[offset : offset + count]
        start, out = offset // 2, scratch[:count]
        out[0::2] = kept[start : start + (count + 1) // 2] & 15
        out[1::2] = kept[start : start + count // 2] >> 4
        return out

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
            self.coders[index].top,
        )


def _packed_buffer(spare: BufferPool | None, nbytes: int) -> np.ndarray:
    """A part's packed codes: from `spare` where they are compressed before they leave
    (given back then), else fresh, since the writer still holds them after."""
    if spare is None:
        return np.empty(nbytes, np.uint8)
    return spare.take(nbytes).numpy()


class BlockedRoute:
    """Codes whole quantized tensors in blocks of rows on a pool of `threads` workers.

    The packed codes of entropy-coded parts are only read by their compression, so their
    buffers are used again for later tensors (`io.buffers`): a fresh one costs a page fault
    per 4 KiB written, and page faults were a large share of pack's system time
    (docs/performance.md, "Pack speed round"). The pool keeps at most the largest tensor's
    worth, which that tensor needs anyway."""

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
        self._spare = BufferPool(0)  # budget set per tensor (`outputs`)

    def close(self) -> None:
        self._pool.close()

    def outputs(self, inputs: TensorInputs) -> list[Output]:
        entry = inputs.entry
        self._spare.budget = max(self._spare.budget, _coded_nbytes(entry))
        parts = _Parts(entry, self._spare)
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

        coded = [i for i, p in enumerate(entry.parts) if p.codec in CODED]
        self._pool.map(compress, coded)
        for i in coded:
            self._spare.give(torch.from_numpy(parts.packed[i]))
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
        pre_raw = inputs.pretrained.view(-1, cols)[first:end]
        sources = [
            (path, raw.view(-1, cols)[first:end])
            for path, raw in zip(self.finetuned, inputs.finetuned, strict=True)
        ]
        minus = pre_raw if self.scheme.subtracts_pretrained else None
        if self.scheme.direct and minus is not None:  # the pretrained block is checked with each
            for index, (path, raw) in enumerate(sources):
                code_direct(ws, parts, index, (path, raw), (self.pretrained, pre_raw), first)
            return
        pre = ws.pre[:count].view(-1, cols)
        if not kernel.widen_into(pre_raw, pre):
            raise not_finite(self.pretrained, name)
        if self.scheme.direct:
            for index, (path, raw) in enumerate(sources):
                if not _code_raw(ws, parts, index, raw, None, first):
                    raise not_finite(path, name)
            return
        pre = pre if minus is not None else None
        encode_block(self.scheme, self.error_correction, ws, parts, sources, pre, first)


def code_direct(
    ws: _Workspace,
    parts: _Parts,
    index: int,
    source: tuple[Path, torch.Tensor],
    pretrained: tuple[Path, torch.Tensor | None],
    first: int,
) -> None:
    """A direct scheme's role `index` in this pass from a block of its input, less the
    pretrained one where given (each `(path, raw rows)`); non-finite values are blamed on the
    right file."""
    (path, raw), (pre_path, pre_raw) = source, pretrained
    if not _code_raw(ws, parts, index, raw, pre_raw, first):
        pre_finite = pre_raw is None or kernel.widen_into(pre_raw, ws.pre[: pre_raw.numel()])
        raise not_finite(path if pre_finite else pre_path, parts.entry.name)


def encode_block(
    scheme: Scheme,
    error_correction: bool,
    ws: _Workspace,
    parts: _Parts,
    sources: list[tuple[Path, torch.Tensor]],
    pre: torch.Tensor | None,
    first: int,
    roles: int | None = None,
) -> None:
    """The scheme's `encode` on a block of rows of every input (`(path, raw rows)`, less the
    widened pretrained block `pre` where given), in this pass; only the first `roles` roles
    where given (`rows.py` codes the shared roles before the tasks')."""
    count = sources[0][1].numel()
    tasks = len(sources) if scheme.coupled else 1
    rows = ws.x[: tasks * count].view(tasks, count)
    block = _BlockInputs(parts.entry.name, sources, rows, pre)

    def code(index: int, values: torch.Tensor, reconstruct: bool = False):
        if roles is not None and index >= roles:
            raise _NotReady
        return _code(ws, parts, index, values, first, reconstruct)

    with contextlib.suppress(_NotReady):  # the rest of the block waits for the next pass
        scheme.encode(block, code, error_correction, ws.shared[:count])


def _coded_nbytes(entry: TensorEntry) -> int:
    """Bytes of the packed codes of `entry`'s entropy-coded parts, before compression."""
    return sum(packed_nbytes(entry.numel, code_width(p)) for p in entry.parts if p.codec in CODED)


def _code_raw(
    ws: _Workspace,
    parts: _Parts,
    index: int,
    raw: torch.Tensor,
    minus: torch.Tensor | None,
    first: int,
) -> bool:
    """A direct scheme's role `index` in this pass, from the block's raw input: record its
    ranges, or code it; returns whether every value ``raw - minus`` is finite."""
    if parts.done[index]:
        return True
    if not parts.ready[index]:
        return parts.ranges(index, raw, minus, first, ws)
    return _emit(ws, parts, index, raw, minus, first)


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
        groups = parts.groups(index, first, count)
        kernel.dequantize_into(
            parts.kept_block(index, first, count, ws.codes),
            parts.parts[index].spec,
            parts.scales[index][groups],
            parts.zeros[index][groups],
            anchor,
        )
        return anchor
    if not parts.ready[index]:
        parts.ranges(index, values, None, first, ws)
        if reconstruct:
            raise _NotReady
        return None
    _emit(ws, parts, index, values, None, first, anchor if reconstruct else None)
    return anchor if reconstruct else None


def _emit(
    ws: _Workspace,
    parts: _Parts,
    index: int,
    raw: torch.Tensor,
    minus: torch.Tensor | None,
    first: int,
    anchor: torch.Tensor | None = None,
) -> bool:
    """Quantize the block ``raw - minus`` of part `index` and bit-pack it into its place;
    optionally dequantize it to `anchor` (and keep the codes if a later pass needs them).
    Returns whether every value is finite."""
    part = parts.parts[index]
    count = raw.numel()
    groups = parts.groups(index, first, count)
    width = parts.width[index]
    start = first * parts.cols * width // 8
    out = parts.packed[index][start : start + packed_nbytes(count, width)]
    if parts.lo[index] is not None:  # two-pass part: ranges from the first pass
        lo, hi, ranged = parts.lo[index][groups], parts.hi[index][groups], True
    else:
        lo, hi = ws.ranges(groups.stop - groups.start)
        ranged = False
    steps = parts.steps[index]
    coder = parts.coders[index]
    finite = coder.encode(
        raw,
        minus,
        parts.width_of(index, count),
        lo,
        hi,
        ranged,
        ws.work,
        ws.codes,
        out,
        parts.scales[index][groups],
        parts.zeros[index][groups],
        None if steps is None else steps[groups],
    )
    if anchor is not None:
        codes = torch.from_numpy(out) if width == 8 and not coder.center else ws.codes[:count]
        scales, zeros = parts.scales[index][groups], parts.zeros[index][groups]
        kernel.dequantize_into(codes, part.spec, scales, zeros, anchor)
        if parts.more_passes or index in parts.keep:
            parts.keep_codes(index, first, codes)
    parts.mark_coded(index)
    return finite
