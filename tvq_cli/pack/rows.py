"""Pack's route for a tensor too large to hold once per input: blocks of rows read as they are
coded, one role at a time.

The blocked route (`blocked.py`) holds every input's whole tensor and every role's codes at
once: for a 128256 x 4096 embedding and 50 fine-tunes that is 50 GB. Here the tensor is coded
role by role. Each pass of a role reads the rows of the inputs it needs a batch of blocks at a
time (pread at the rows' offset, the next batch read while this one is coded) and codes the
blocks on the worker pool with the blocked route's kernels, so the stored bytes are the same.
The role is then compressed and handed to the writer, and its buffers are dropped: memory holds
one role's codes, the role before it being written and two batches of rows, whatever the number
of tasks.

A direct scheme's role t reads the pretrained and fine-tune t. A coupled scheme's shared roles
(RTVQ's base) are coded first from every input's rows, their codes kept; task t's role is then
its task vector less their reconstruction (`Scheme.anchor`, as `tvq add` codes an added task),
which is what `encode` gives with error correction (without it the anchor is the exact mean of
every task vector: such tensors keep the blocked route). Each input's fingerprint digest is fed
its rows in order in the first pass that reads them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..archive.format import ArchiveHeader, TensorEntry
from ..archive.schemes import Scheme
from ..concurrency import WorkerPool
from ..dtypes import itemsize
from ..errors import TvqError
from ..io.buffers import BufferPool
from ..io.checkpoint import Checkpoint, digest_start
from ..io.task_source import TaskSource
from ..quant import entropy, kernel
from ..quant.sizes import CODED, packed_nbytes
from ..tensors import not_finite, tensor_bytes
from .blocked import (
    BLOCK_ELEMENTS,
    Output,
    _code,
    _Parts,
    _Workspace,
    blockable,
    code_direct,
    code_width,
    encode_block,
)
from .packer import added_outputs

# Bytes the blocked route would hold for one tensor (every input's raw tensor and every role's
# codes) past which the tensor is read by rows instead. The reader reads the next held tensor
# while one goes by rows, so the peak is about this route's own (1 GB for a 128256 x 4096 bf16
# tensor at 4 bits) plus this bound.
ROWS_ABOVE = 256 << 20
BATCH_BYTES = 64 << 20  # rows read per batch, over every input a pass reads


def held_bytes(entry: TensorEntry, tasks: int) -> int:
    """What the blocked route holds for `entry` with `tasks` fine-tunes."""
    raw = entry.numel * itemsize(entry.dtype) * (tasks + 1)
    return raw + sum(packed_nbytes(entry.numel, code_width(p)) for p in entry.parts)


def by_rows(
    entry: TensorEntry, scheme: Scheme, error_correction: bool, sources: list[TaskSource]
) -> bool:
    """Whether `entry` is packed by this route: a large 2-D quantized tensor whose parts are
    coded by blocks of rows, stored as it is read in every fine-tune, under a scheme whose task
    roles follow from the shared ones' reconstruction."""
    if entry.kind != "quantized" or len(entry.shape) != 2:
        return False
    if not all(p.dense and blockable(p, entry.shape[-1]) for p in entry.parts):
        return False
    if not (scheme.direct or (error_correction and scheme.corrects_error)):
        return False
    if any(source.row_source(entry.name) is None for source in sources):
        return False
    return held_bytes(entry, len(sources)) > ROWS_ABOVE


@dataclass
class _Input:
    """One input as this route reads it: where its rows are; until its first pass has read
    every row (`fed`), its fingerprint digest (None where it has none of its own) and whether
    every row equals the pretrained's (a fine-tune); the rows it added past the pretrained's."""

    path: Path
    checkpoint: Checkpoint
    name: str
    digest: hashlib._Hash | None = None
    equal: bool = False
    fed: bool = False
    added: torch.Tensor | None = None


@dataclass
class RowsResult:
    """The pretrained tensor's digest, and the fine-tunes equal to it in every row."""

    digest: bytes
    unchanged: set[int]


Block = Callable[[_Workspace, list[torch.Tensor], int], None]


class RowsRoute:
    """Codes tensors too large to hold once per input by blocks of rows, role by role."""

    def __init__(
        self,
        scheme: Scheme,
        error_correction: bool,
        header: ArchiveHeader,
        pretrained: Checkpoint,
        finetuned: list[TaskSource],
        threads: int,
    ):
        self.scheme, self.error_correction = scheme, error_correction
        self.header, self.pretrained, self.finetuned = header, pretrained, finetuned
        self._threads = threads
        self._pool = WorkerPool(threads, "tvq-rows")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="tvq-rows-read")
        self._spare = BufferPool(0)  # one role's packed codes, used again by the next role
        self._local = threading.local()
        self._buffers: list[list[torch.Tensor]] = []  # per input of a pass: two, in turn

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._pool.close()

    def pack(
        self,
        entry: TensorEntry,
        emit: Callable[[list[Output]], None],
        status: Callable[[str], None] = lambda text: None,
    ) -> RowsResult:
        """Code `entry`, handing each role's stored tensors to `emit` in storage order, then
        the rows each fine-tune added; `status` is told which role is being coded (a long
        tensor's progress)."""
        parts = _Parts(entry, self._spare, opened=False)
        self._spare.budget = max(self._spare.budget, _largest_coded(entry))
        pre = _Input(self.pretrained.path, self.pretrained, entry.name)
        pre.digest = digest_start(entry.name, entry.dtype, entry.shape)
        fts = [self._input(source, entry) for source in self.finetuned]
        shared = len(self.scheme.shared_roles)
        roles = len(parts.parts)
        if shared:
            status(f"{entry.name} by rows: {', '.join(self.scheme.shared_roles)}")
            parts.keep = set(range(shared))
            self._passes(parts, range(shared), [pre, *fts], self._shared_block(parts, shared))
            emit([out for index in range(shared) for out in self._store(parts, index)])
        for task, ft in enumerate(fts):
            index = shared + task
            status(f"{entry.name} by rows: {parts.parts[index].role} ({index + 1}/{roles})")
            self._passes(parts, [index], [pre, ft], self._task_block(parts, index, shared))
            emit(self._store(parts, index))
        paths, added = [ft.path for ft in fts], [ft.added for ft in fts]
        emit(added_outputs(self.header, self.header.tasks, entry, paths, added))
        for source, ft in zip(self.finetuned, fts, strict=True):
            if ft.digest is not None:
                source.adopt_digests({ft.name: ft.digest.digest()})
        return RowsResult(pre.digest.digest(), {t for t, ft in enumerate(fts) if ft.equal})

    def _input(self, source: TaskSource, entry: TensorEntry) -> _Input:
        checkpoint, name = source.row_source(entry.name)
        spec = checkpoint.specs[name]
        if spec.shape[1:] != entry.shape[1:] or spec.shape[0] < entry.shape[0]:
            raise TvqError(f"{source.path}: tensor {name} has shape {list(spec.shape)}")
        ft = _Input(source.path, checkpoint, name, equal=spec.dtype == entry.dtype)
        if checkpoint is not self.pretrained:  # a tensor of the fine-tune's own files
            ft.digest = digest_start(name, spec.dtype, spec.shape)
        return ft

    def _passes(self, parts: _Parts, indices, inputs: list[_Input], block: Block) -> None:
        """Every pass of the roles `indices` over the tensor's rows, a batch of blocks read
        while the one before is coded: `block(workspace, each input's rows, first row)`."""
        indices = list(indices)
        for index in indices:
            parts.open(index)
        rows, cols = parts.entry.shape
        # a block of every input's fp32 rows fits a workspace of BLOCK_ELEMENTS per input
        step = max(8, BLOCK_ELEMENTS // (len(inputs) - 1) // cols // 8 * 8)
        per_block = step * sum(item.checkpoint.row_bytes(item.name) for item in inputs)
        batch = step * max(self._threads, BATCH_BYTES // per_block)
        spans = [(a, min(rows, a + batch)) for a in range(0, rows, batch)]
        while not all(parts.done[i] for i in indices):
            parts.start_pass(indices)
            pending = self._reader.submit(self._read, inputs, *spans[0], 0)
            for turn, (first, end) in enumerate(spans):
                read = pending.result()
                if turn + 1 < len(spans):
                    pending = self._reader.submit(self._read, inputs, *spans[turn + 1], turn + 1)

                def one(a: int, first=first, end=end, read=read) -> None:
                    stop = min(end, a + step)
                    ws = self._workspace(step * cols, len(inputs) - 1)
                    block(ws, [r[a - first : stop - first] for r in read], a)

                self._pool.map(one, range(first, end, step))
            parts.end_pass()
            for item in inputs:
                self._fed(item, rows)
        del self._buffers[2:]  # a shared role's pass read every input: one task's are kept

    def _read(self, inputs: list[_Input], first: int, end: int, turn: int) -> list[torch.Tensor]:
        """Rows [first, end) of every input into its buffer for this turn (two alternate);
        digests and equality fed in order on an input's first pass."""
        out = []
        while len(self._buffers) < len(inputs):
            self._buffers.append([torch.empty(0, dtype=torch.uint8)] * 2)
        for item, buffers in zip(inputs, self._buffers, strict=False):
            nbytes = (end - first) * item.checkpoint.row_bytes(item.name)
            if buffers[turn % 2].numel() < nbytes:
                buffers[turn % 2] = torch.empty(nbytes, dtype=torch.uint8)
            rows = item.checkpoint.load_rows(item.name, first, end, buffers[turn % 2])
            if item.digest is not None and not item.fed:
                item.digest.update(tensor_bytes(rows))
            out.append(rows)
        for item, rows in zip(inputs[1:], out[1:], strict=True):
            if item.equal and not item.fed:
                item.equal = torch.equal(rows, out[0])
        return out

    def _fed(self, item: _Input, rows: int) -> None:
        """After a pass over every row: the rows an input added end its digest."""
        if item.fed:
            return
        own = item.checkpoint.specs[item.name].shape[0]
        if own > rows:
            item.added = item.checkpoint.load_rows(item.name, rows, own)
            if item.digest is not None:
                item.digest.update(tensor_bytes(item.added))
        item.fed = True

    def _workspace(self, size: int, tasks: int) -> _Workspace:
        ws = getattr(self._local, "ws", None)
        if ws is None or ws.size != size or ws.x.numel() != tasks * size:
            ws = self._local.ws = _Workspace(size, tasks)
        return ws

    def _shared_block(self, parts: _Parts, shared: int) -> Block:
        """A block of the shared roles, from every input: the scheme's `encode`, stopped at
        the first task role."""
        name, scheme = parts.entry.name, self.scheme
        paths = [source.path for source in self.finetuned]

        def block(ws: _Workspace, rows: list[torch.Tensor], first: int) -> None:
            pre_raw = rows[0]
            pre = ws.pre[: pre_raw.numel()].view(pre_raw.shape)
            if not kernel.widen_into(pre_raw, pre):
                raise not_finite(self.pretrained.path, name)
            sources = list(zip(paths, rows[1:], strict=True))
            pre = pre if scheme.subtracts_pretrained else None
            encode_block(scheme, self.error_correction, ws, parts, sources, pre, first, shared)

        return block

    def _task_block(self, parts: _Parts, index: int, shared: int) -> Block:
        """A block of task role `index`, from the pretrained and that task's fine-tune."""
        name, scheme = parts.entry.name, self.scheme
        path = self.finetuned[index - shared].path
        minus_pre = scheme.subtracts_pretrained
        roles = {part.role: i for i, part in enumerate(parts.parts[:shared])}

        def block(ws: _Workspace, rows: list[torch.Tensor], first: int) -> None:
            pre_raw, raw = rows
            if not shared:
                if not minus_pre and not kernel.widen_into(pre_raw, ws.pre[: raw.numel()]):
                    raise not_finite(self.pretrained.path, name)  # checked as the held route does
                pre = (self.pretrained.path, pre_raw if minus_pre else None)
                code_direct(ws, parts, index, (path, raw), pre, first)
                return
            values = ws.x[: raw.numel()]
            if not kernel.widen_into(raw, values.view(raw.shape), pre_raw if minus_pre else None):
                blamed = kernel.widen_into(pre_raw, ws.pre[: raw.numel()])
                raise not_finite(path if blamed else self.pretrained.path, name)
            anchor = scheme.anchor(lambda role: _code(ws, parts, roles[role], values, first, True))
            values.sub_(anchor)
            _code(ws, parts, index, values, first, False)

        return block

    def _store(self, parts: _Parts, index: int) -> list[Output]:
        """Role `index`'s stored tensors, its buffers dropped (the codes' compressed)."""
        codes = parts.packed[index]
        codec = parts.entry.parts[index].codec
        if codec in CODED:
            compressed = entropy.compress(codes, codec)
            self._spare.give(torch.from_numpy(codes))
            codes = compressed
        out = parts.stored(index, codes)
        parts.close(index)
        return out


def _largest_coded(entry: TensorEntry) -> int:
    """Bytes of the largest entropy-coded part's packed codes (one is coded at a time)."""
    coded = [p for p in entry.parts if p.codec in CODED]
    return max((packed_nbytes(entry.numel, code_width(p)) for p in coded), default=0)
