"""One tensor's stored parts, computed from its raw inputs: the arithmetic of `pack`.

Quantized tensors whose groups tile the rows (the default group size on transformer shapes) are
processed in blocks of whole rows: each block of every input is widened to fp32, its task
vectors formed, quantized and bit-packed in per-thread buffers, and blocks run in parallel on a
thread pool. Groups never cross rows and every step of the quantizer (range search included) is
per group, so a block's codes, scales and zero-points are exactly those of the whole tensor.
Parts that hang on values taken from every group's range (compact scales: the grid's top step;
one min-max range per tensor: that range) first pass over the blocks for the ranges alone;
zstd frames are compressed once a part's codes are complete. Every other case (a searched range
per tensor, groups that do not divide the rows, `--device cuda`) takes the whole tensor at once
through `quantize` itself. RTVQ's base is the task vectors' sum in task order divided by T, so
both routes give the same bytes whatever the block size or thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .archive.format import Part, TensorEntry, delta_key, shared_key
from .archive.parts import encode_part, store_part
from .checkpoint import all_finite, tensor_bytes
from .errors import TvqError
from .pipeline import TensorInputs, torch_threads
from .quant import entropy, kernel, range_search
from .quant.bitpack import pack_into, packed_nbytes
from .quant.quantizer import Quantized, dequantize, group_count, quantize

BLOCK_ELEMENTS = 1 << 19  # elements per block of rows (2 MiB fp32 buffers): fewer Python steps
Output = tuple[str, np.ndarray | memoryview]


@dataclass(frozen=True)
class Settings:
    scheme: str
    error_correction: bool
    tasks: list[str]
    pretrained: Path
    finetuned: list[Path]
    device: torch.device


def block_rows(cols: int) -> int:
    """Rows per block: about BLOCK_ELEMENTS elements, a multiple of 8 rows so that every
    block's packed codes start on a byte boundary."""
    return max(8, BLOCK_ELEMENTS // cols // 8 * 8)


class _Workspace:
    """One thread's reusable buffers for blocks of up to `size` elements."""

    def __init__(self, size: int, tasks: int, rtvq: bool):
        padded = -(-size // 8) * 8
        self.size = size
        self.pre = torch.empty(size)
        self.x = torch.empty(size)
        self.codes = torch.zeros(padded, dtype=torch.uint8)
        self.packed = np.empty(padded, np.uint8)
        self.scratch = np.empty(padded // 8, np.uint64)
        self.deltas = torch.empty(tasks * size) if rtvq else None
        self.base = torch.empty(size) if rtvq else None
        self.anchor = torch.empty(size) if rtvq else None


def _two_pass(part: Part) -> bool:
    """Whether a part needs every group's range before any block is coded: compact scales
    (the grid's top is the tensor's largest step) and one range per tensor."""
    return part.scale_bits > 0 or part.group_size == 0


def _blockable(part: Part, cols: int) -> bool:
    """Whether blocks of rows code a part exactly as the whole tensor: groups that tile the
    rows, or one min-max range per tensor (taken in a first pass). A searched per-tensor
    range needs the whole tensor's error for every candidate."""
    if part.group_size == 0:
        return part.range == "minmax"
    return cols % part.group_size == 0


class _Parts:
    """The growing stored tensors of one quantized tensor: packed (or byte-aligned, for zstd)
    codes, scales or step codes, zero codes; and, for two-pass parts (`_two_pass`), every
    group's range, gathered in a first pass."""

    def __init__(self, entry: TensorEntry):
        self.entry = entry
        self.cols = entry.shape[-1]
        parts = entry.parts
        self.width = [entropy.SYMBOL_BITS[p.bits] if p.codec == "zstd" else p.bits for p in parts]
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
        self.kept: torch.Tensor | None = None  # RTVQ's base codes, when offsets come later
        self._lock = threading.Lock()

    def groups(self, index: int, first: int, count: int) -> slice:
        """The groups of part `index` in the block of `count` elements from row `first`."""
        size = self.entry.parts[index].group_size
        if size == 0:
            return slice(0, 1)
        start = first * (self.cols // size)
        return slice(start, start + count // size)

    def ranges(self, index: int, x: torch.Tensor, first: int) -> None:
        """Record the range of every group of block `x` of part `index`."""
        size = self.entry.parts[index].group_size
        lo, hi = range_search.group_ranges(x.reshape(-1, size) if size else x.reshape(1, -1))
        if size:
            groups = self.groups(index, first, x.numel())
            self.lo[index][groups] = lo
            self.hi[index][groups] = hi
            return
        with self._lock:  # blocks of one per-tensor range, in any order: min and max commute
            torch.minimum(self.lo[index], lo, out=self.lo[index])
            torch.maximum(self.hi[index], hi, out=self.hi[index])

    def finish_ranges(self, indices: Iterable[int]) -> None:
        for i in indices:
            self.grid[i] = range_search.grid_top(self.lo[i], self.hi[i], self.entry.parts[i].spec)
            self.ready[i] = True

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


class TensorPacker:
    """Turns each tensor's raw inputs into its stored tensors, in the archive's layout order."""

    def __init__(self, settings: Settings, threads: int):
        self.settings = settings
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, "tvq-quant") if threads > 1 else None
        self._local = threading.local()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def outputs(self, inputs: TensorInputs) -> list[Output]:
        entry = inputs.entry
        if entry.kind == "shared":
            return self._shared(inputs)
        if entry.kind == "exact":
            return self._exact(inputs)
        cols = entry.shape[-1]
        if self.settings.device.type == "cpu" and all(_blockable(p, cols) for p in entry.parts):
            return self._blocked(inputs)
        with torch_threads(self.threads):
            return self._whole(inputs)

    # --- small tensors --------------------------------------------------------------------
    def _shared(self, inputs: TensorInputs) -> list[Output]:
        name = inputs.entry.name
        for path, raw in zip(self.settings.finetuned, inputs.finetuned, strict=True):
            if not torch.equal(raw, inputs.pretrained):
                raise TvqError(f"{path}: non-float tensor {name} differs from the pretrained one")
        return [(shared_key(name), tensor_bytes(inputs.pretrained))]

    def _exact(self, inputs: TensorInputs) -> list[Output]:
        name = inputs.entry.name
        pre = self._float(inputs.pretrained, self.settings.pretrained, name)
        out: list[Output] = []
        for task, path, raw in zip(
            self.settings.tasks, self.settings.finetuned, inputs.finetuned, strict=True
        ):
            delta = self._float(raw, path, name).sub_(pre)
            out.append((delta_key(task, name), tensor_bytes(delta.cpu())))
        return out

    def _float(self, raw: torch.Tensor, path: Path, name: str) -> torch.Tensor:
        tensor = raw.to(self.settings.device, torch.float32)
        _check(tensor, path, name)
        return tensor

    # --- whole tensor through quantize() ---------------------------------------------------
    def _whole(self, inputs: TensorInputs) -> list[Output]:
        entry, settings = inputs.entry, self.settings
        name, parts = entry.name, entry.parts
        pre = self._float(inputs.pretrained, settings.pretrained, name)
        fts = zip(settings.finetuned, inputs.finetuned, strict=True)
        out: list[Output] = []
        if settings.scheme == "fq":
            for part, (path, raw) in zip(parts, fts, strict=True):
                out += _stored(part, name, quantize(self._float(raw, path, name), part.spec))
            return out
        deltas = (self._float(raw, path, name).sub_(pre) for path, raw in fts)
        if settings.scheme == "tvq":
            for part, delta in zip(parts, deltas, strict=True):
                out += _stored(part, name, quantize(delta, part.spec))
            return out
        deltas = list(deltas)
        del pre
        base = task_mean(deltas)
        base_q = quantize(base, parts[0].spec)
        out += _stored(parts[0], name, base_q)
        anchor = (
            dequantize(base_q, parts[0].spec, entry.shape) if settings.error_correction else base
        )
        for part, delta in zip(parts[1:], deltas, strict=True):
            out += _stored(part, name, quantize(delta.sub_(anchor), part.spec))
        return out

    # --- blocks of rows, in parallel ---------------------------------------------------------
    def _blocked(self, inputs: TensorInputs) -> list[Output]:
        entry = inputs.entry
        parts = _Parts(entry)
        rows = entry.numel // parts.cols
        step = block_rows(parts.cols)
        phases = _phases(entry.parts, self.settings.scheme)
        if "offsets" in phases and self.settings.error_correction:
            parts.kept = torch.empty(entry.numel, dtype=torch.uint8)
        for phase in phases:

            def block(first: int, phase: str = phase, check: bool = phase == phases[0]) -> None:
                end = min(rows, first + step)
                self._block(inputs, parts, first, end, step * parts.cols, phase, check)

            self._map(block, range(0, rows, step))
            pending = [i for i, ready in enumerate(parts.ready) if not ready]
            if phase == "ranges":
                parts.finish_ranges([0] if self.settings.scheme == "rtvq" else pending)
            elif phase == "base":
                parts.finish_ranges(pending)
        return self._stored(parts)

    def _stored(self, parts: _Parts) -> list[Output]:
        """Every part's stored tensors; zstd frames of the parts are compressed in parallel."""
        entry = parts.entry
        codes: list[np.ndarray | bytes] = list(parts.packed)

        def compress(i: int) -> None:
            codes[i] = entropy.compress(parts.packed[i])

        self._map(compress, [i for i, p in enumerate(entry.parts) if p.codec == "zstd"])
        out: list[Output] = []
        for i in range(len(entry.parts)):
            out += parts.stored(i, codes[i])
        return out

    def _map(self, job: Callable[[int], None], items: Iterable[int]) -> None:
        if self._pool is None:
            for item in items:
                job(item)
        else:
            for _ in self._pool.map(job, items):
                pass

    def _workspace(self, size: int) -> _Workspace:
        ws = getattr(self._local, "ws", None)
        if ws is None or ws.size < size:
            rtvq = self.settings.scheme == "rtvq"
            ws = self._local.ws = _Workspace(size, len(self.settings.finetuned), rtvq)
        return ws

    def _block(
        self,
        inputs: TensorInputs,
        parts: _Parts,
        first: int,
        end: int,
        size: int,
        phase: str,
        check: bool,
    ) -> None:
        """One phase (see `_phases`) of one block of rows; `check`: test inputs are finite."""
        settings, name, cols = self.settings, inputs.entry.name, parts.cols
        ws = self._workspace(size)
        count = (end - first) * cols
        pre = ws.pre[:count].view(-1, cols)
        finite = kernel.widen_into(inputs.pretrained.view(-1, cols)[first:end], pre)
        if check and not finite:
            _not_finite(settings.pretrained, name)
        fts = [
            (path, raw.view(-1, cols)[first:end])
            for path, raw in zip(settings.finetuned, inputs.finetuned, strict=True)
        ]
        if settings.scheme != "rtvq":
            x = ws.x[:count].view(-1, cols)
            minus = pre if settings.scheme == "tvq" else None
            for i, (path, ft) in enumerate(fts):
                if not kernel.widen_into(ft, x, minus) and check:
                    _not_finite(path, name)
                if phase == "ranges":
                    parts.ranges(i, x, first)
                else:
                    self._emit(ws, parts, i, x, first)
            return
        deltas = ws.deltas[: len(fts) * count].view(len(fts), -1)
        for delta, (path, ft) in zip(deltas, fts, strict=True):
            if not kernel.widen_into(ft, delta, pre) and check:
                _not_finite(path, name)
        base = ws.base[:count]
        task_mean(list(deltas), out=base)
        if phase == "ranges":
            parts.ranges(0, base, first)
            return
        ec = settings.error_correction
        anchor = ws.anchor[:count] if ec else base
        if phase == "offsets":
            if ec:
                offset = first * cols
                kept = parts.kept[offset : offset + count]
                groups = parts.groups(0, first, count)
                spec = parts.entry.parts[0].spec
                kernel.dequantize_into(
                    kept, spec, parts.scales[0][groups], parts.zeros[0][groups], anchor
                )
        else:
            self._emit(ws, parts, 0, base, first, anchor if ec else None)
        for i, delta in enumerate(deltas, start=1):
            delta.sub_(anchor)
            if not parts.ready[i]:  # two-pass offsets: coded in the "offsets" phase
                parts.ranges(i, delta, first)
            else:
                self._emit(ws, parts, i, delta, first)

    def _emit(
        self,
        ws: _Workspace,
        parts: _Parts,
        index: int,
        x: torch.Tensor,
        first: int,
        anchor: torch.Tensor | None = None,
    ) -> None:
        """Quantize block `x` of part `index` into its place; optionally dequantize it to
        `anchor` (RTVQ's error correction) before the codes are packed."""
        part = parts.entry.parts[index]
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
        if index == 0 and parts.kept is not None:
            offset = first * parts.cols
            parts.kept[offset : offset + count] = codes
        padded = -(-count // 8) * 8
        ws.codes[count:padded] = 0
        width = parts.width[index]
        packed = ws.packed[: padded * width // 8]
        pack_into(ws.codes[:padded].numpy(), width, packed, ws.scratch)
        start, size = first * parts.cols * width // 8, packed_nbytes(count, width)
        parts.packed[index][start : start + size] = packed[:size]


def _phases(parts: list[Part], scheme: str) -> list[str]:
    """Passes over a tensor's blocks. Two-pass parts (`_two_pass`) need every group's range
    before any block is coded, so they get a "ranges" pass first. TVQ / FQ: ["ranges"], "all".
    RTVQ: ["ranges" of the base], "base" (the base coded; the offsets coded too, or only their
    ranges taken when they are two-pass), then ["offsets"] (coded against the base's
    reconstruction, kept from the "base" pass)."""
    two_pass = [_two_pass(p) for p in parts]
    if scheme != "rtvq":
        return (["ranges"] if any(two_pass) else []) + ["all"]
    first = ["ranges"] if two_pass[0] else []
    return first + ["base"] + (["offsets"] if any(two_pass[1:]) else [])


def task_mean(deltas: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """RTVQ's base: the sum of the task vectors in task order, divided by their count.

    An explicit order (rather than `torch.stack(...).mean(0)`, whose summation order depends on
    the tensor's size) makes the result the same for a whole tensor and for any block of it,
    and needs no stacked copy of all task vectors.
    """
    base = deltas[0].clone() if out is None else out.copy_(deltas[0])
    for delta in deltas[1:]:
        base.add_(delta)
    return base.div_(len(deltas))


def _check(tensor: torch.Tensor, path: Path, name: str) -> None:
    if not all_finite(tensor):
        _not_finite(path, name)


def _not_finite(path: Path, name: str) -> None:
    raise TvqError(f"{path}: tensor {name} contains NaN or Inf")


def _stored(part: Part, name: str, q: Quantized) -> list[Output]:
    return encode_part(part, name, q.cpu())
