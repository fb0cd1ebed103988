"""One tensor's stored parts, computed from its raw inputs: the arithmetic of `pack`.

Quantized tensors whose groups tile the rows (the default group size on transformer shapes)
are processed in blocks of whole rows: each block of every input is converted to fp32, its
task vectors formed, quantized and bit-packed in per-thread buffers that stay in cache, and
blocks run in parallel on a thread pool. Groups never cross rows, so a block's codes, scales and
zero-points are exactly those of the whole tensor. Every other case (per-tensor ranges, groups
that do not divide the rows, `--device cuda`) takes the whole tensor at once through
`quantize` itself. RTVQ's base is the task vectors' sum in task order divided by T, so both
routes give the same bytes whatever the block size or thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .archive.format import Part, TensorEntry, delta_key, part_keys, shared_key
from .archive.parts import encode_part
from .checkpoint import all_finite, tensor_bytes
from .errors import TvqError
from .pipeline import TensorInputs, torch_threads
from .quant import kernel
from .quant.bitpack import pack_bits, pack_into, packed_nbytes
from .quant.quantizer import Quantized, dequantize, group_count, quantize

BLOCK_ELEMENTS = 1 << 17  # elements per block of rows: fp32 buffers of 512 KiB stay in cache
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
        self.work = torch.empty(size)
        self.codes = torch.zeros(padded, dtype=torch.uint8)
        self.packed = np.empty(padded, np.uint8)
        self.scratch = np.empty(padded // 8, np.uint64)
        self.deltas = torch.empty(tasks * size) if rtvq else None
        self.base = torch.empty(size) if rtvq else None
        self.anchor = torch.empty(size) if rtvq else None


class _Parts:
    """The growing stored tensors of one quantized tensor: packed codes, scales, zero codes."""

    def __init__(self, entry: TensorEntry):
        self.entry = entry
        self.cols = entry.shape[-1]
        self.packed = [np.empty(packed_nbytes(entry.numel, p.bits), np.uint8) for p in entry.parts]
        groups = [group_count(entry.shape, p.group_size) for p in entry.parts]
        self.scales = [torch.empty(g) for g in groups]
        self.zeros = [torch.empty(g, dtype=torch.uint8) for g in groups]

    def outputs(self) -> list[Output]:
        out: list[Output] = []
        for i, part in enumerate(self.entry.parts):
            codes, scales, zeros = part_keys(part, self.entry.name)
            out += [
                (codes, self.packed[i]),
                (scales, self.scales[i].numpy()),
                (zeros, pack_bits(self.zeros[i].numpy(), part.bits)),
            ]
        return out


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
        if self.settings.device.type == "cpu" and all(
            kernel.covers(p.spec, cols) and p.codec == "raw" for p in entry.parts
        ):
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

        def block(first: int) -> None:
            self._block(inputs, parts, first, min(rows, first + step), step * parts.cols)

        self._map(block, range(0, rows, step))
        return parts.outputs()

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

    def _block(self, inputs: TensorInputs, parts: _Parts, first: int, end: int, size: int) -> None:
        settings, name, cols = self.settings, inputs.entry.name, parts.cols
        ws = self._workspace(size)
        count = (end - first) * cols
        pre = ws.pre[:count].view(-1, cols)
        pre.copy_(inputs.pretrained.view(-1, cols)[first:end])
        _check(pre, settings.pretrained, name)
        fts = [
            (path, raw.view(-1, cols)[first:end])
            for path, raw in zip(settings.finetuned, inputs.finetuned, strict=True)
        ]
        if settings.scheme != "rtvq":
            x = ws.x[:count].view(-1, cols)
            for i, (path, ft) in enumerate(fts):
                x.copy_(ft)  # widen, then subtract: a mixed-dtype sub is not vectorized
                if settings.scheme == "tvq":
                    x.sub_(pre)
                _check(x, path, name)
                self._emit(ws, parts, i, x, first)
            return
        deltas = ws.deltas[: len(fts) * count].view(len(fts), -1)
        for delta, (path, ft) in zip(deltas, fts, strict=True):
            delta.view(-1, cols).copy_(ft)
            delta.sub_(pre.view(-1))
            _check(delta, path, name)
        base = ws.base[:count]
        task_mean(list(deltas), out=base)
        anchor = ws.anchor[:count] if settings.error_correction else base
        self._emit(ws, parts, 0, base, first, anchor if settings.error_correction else None)
        for i, delta in enumerate(deltas, start=1):
            self._emit(ws, parts, i, delta.sub_(anchor), first)

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
        start = first * (parts.cols // part.group_size)
        groups = slice(start, start + count // part.group_size)
        scales, zeros = parts.scales[index][groups], parts.zeros[index][groups]
        codes = ws.codes[:count]
        kernel.quantize_into(x.reshape(-1), part.spec, codes, scales, zeros, ws.work[:count])
        if anchor is not None:
            kernel.dequantize_into(codes, part.spec, scales, zeros, anchor)
        padded = -(-count // 8) * 8
        ws.codes[count:padded] = 0
        packed = ws.packed[: padded * part.bits // 8]
        pack_into(ws.codes[:padded].numpy(), part.bits, packed, ws.scratch)
        start, size = first * parts.cols * part.bits // 8, packed_nbytes(count, part.bits)
        parts.packed[index][start : start + size] = packed[:size]


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
        raise TvqError(f"{path}: tensor {name} contains NaN or Inf")


def _stored(part: Part, name: str, q: Quantized) -> list[Output]:
    return encode_part(part, name, q.cpu())
