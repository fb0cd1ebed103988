"""One tensor's stored tensors from its raw inputs, in the archive's layout order.

Non-float tensors are stored once (identical in every input), exact tensors as fp32 deltas,
quantized tensors through the blocked route where it gives the same bytes as the whole tensor
(`blocked.blockable`), else through the whole-tensor route. A low-rate record that belongs in
its role's frame comes out under the frame's key, for the caller to append to that frame.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..archive.format import (
    ArchiveHeader,
    Part,
    TensorEntry,
    delta_key,
    frame_key,
    record_key,
    rows_key,
    shared_key,
)
from ..archive.parts import encode_part
from ..archive.schemes import Scheme
from ..concurrency import torch_threads
from ..dtypes import to_torch
from ..errors import TvqError
from ..quant import native
from ..tensors import require_finite, tensor_bytes
from .blocked import BlockedRoute, Output, blockable
from .prefetch import TensorInputs
from .values import TaskValues, widen
from .whole import Coded, encode_whole


class TensorPacker:
    """Turns each tensor's raw inputs into its stored tensors."""

    def __init__(
        self,
        scheme: Scheme,
        error_correction: bool,
        tasks: list[str],
        pretrained: Path,
        finetuned: list[Path],
        device: torch.device,
        threads: int,
    ):
        self.scheme = scheme
        self.tasks = tasks
        self.error_correction = error_correction
        self.pretrained = pretrained
        self.finetuned = finetuned
        self.device = device
        self.threads = threads
        self.blocked = BlockedRoute(scheme, error_correction, pretrained, finetuned, threads)

    def close(self) -> None:
        self.blocked.close()

    def outputs(self, inputs: TensorInputs) -> list[Output]:
        entry = inputs.entry
        if entry.kind == "shared":
            return self._shared(inputs)
        if entry.kind == "exact":
            return self._exact(inputs)
        cols = entry.shape[-1]
        on_cpu = self.device.type == "cpu"
        if on_cpu and all(p.dense and blockable(p, cols) for p in entry.parts):
            return self.blocked.outputs(inputs)
        # On the CPU the whole route's work is in the native kernels (one thread); torch's
        # thread team would only add hand-offs (3-5x slower measured on a loaded 2-core
        # machine, docs/performance.md). Without them, torch's own ops do the work.
        with torch_threads(1 if on_cpu and native.built() else self.threads):
            return self._whole(inputs)

    def _shared(self, inputs: TensorInputs) -> list[Output]:
        name = inputs.entry.name
        for path, raw in zip(self.finetuned, inputs.finetuned, strict=True):
            if not torch.equal(raw, inputs.pretrained):
                raise TvqError(f"{path}: non-float tensor {name} differs from the pretrained one")
        # a copy: the inputs' buffers are read into again once released (prefetch.py)
        return [(shared_key(name), tensor_bytes(inputs.pretrained.clone()))]

    def _exact(self, inputs: TensorInputs) -> list[Output]:
        name = inputs.entry.name
        pre = widen(inputs.pretrained, self.device, self.pretrained, name)
        out: list[Output] = []
        for task, tau in zip(self.tasks, self._values(inputs, pre), strict=True):
            out.append((delta_key(task, name), tensor_bytes(tau.cpu())))
        return out

    def _whole(self, inputs: TensorInputs) -> list[Output]:
        entry = inputs.entry
        pre = widen(inputs.pretrained, self.device, self.pretrained, entry.name)
        values = self._values(inputs, pre if self.scheme.subtracts_pretrained else None)
        out: list[Output] = []
        for part, coded in encode_whole(entry, self.scheme, values, self.error_correction):
            out += coded_outputs(part, entry, coded)
        return out

    def _values(self, inputs: TensorInputs, pre: torch.Tensor | None) -> TaskValues:
        sources = [
            (path, lambda raw=raw: raw)
            for path, raw in zip(self.finetuned, inputs.finetuned, strict=True)
        ]
        return TaskValues(inputs.entry.name, sources, pre, self.device)


def coded_outputs(part: Part, entry: TensorEntry, coded: Coded) -> list[Output]:
    """A part's stored tensors; a low-rate record in a frame comes out under the frame's key."""
    if part.dense:
        return encode_part(part, entry.name, entry.shape, coded.cpu())
    key = frame_key(part.role) if entry.framed else record_key(part, entry.name)
    return [(key, coded.record)]


def added_rows(header: ArchiveHeader, tasks: list[str], inputs: TensorInputs) -> list[Output]:
    """The rows each of `tasks` (those of `inputs`) added to this tensor (new tokens), kept
    exactly in its dtype."""
    return added_outputs(header, tasks, inputs.entry, inputs.paths, inputs.added)


def added_outputs(
    header: ArchiveHeader,
    tasks: list[str],
    entry: TensorEntry,
    paths: list[Path],
    added: list[torch.Tensor | None],
) -> list[Output]:
    """The stored tensors of the rows (None: none) each task added to `entry`."""
    out: list[Output] = []
    for task, path, rows in zip(tasks, paths, added, strict=True):
        if rows is not None:
            dtype = to_torch(header.info(task).dtype_of(entry))
            rows = require_finite(rows, path, entry.name).to(dtype, copy=True)  # buffers reused
            out.append((rows_key(task, entry.name), tensor_bytes(rows)))
    return out
