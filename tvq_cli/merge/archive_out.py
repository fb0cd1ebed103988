"""Quantized merge output: the merged task vector as a one-task archive on a B-bit grid.

Two grids:
- "min-max" (general case): a TVQ archive; each tensor's grid is the usual asymmetric
  min-max quantizer of the merged task vector, with --bits and --group-size.
- "inputs" (HDRQ's own setting): `--method average` of FQ archives that share bits and
  groups is written back on the inputs' grid: an FQ archive whose step per group is the
  (weighted) mean of the input steps and whose zero-point is the rounded mean zero-point.
  A value is ambiguous exactly where the mean of the integer codes is a .5 (an odd code sum
  for two inputs).
Values are put on the grid by `rounding.round_on_grid` (nearest, floor or noise-sampled); 1-D
tensors are stored exact and non-float tensors are copied, as `tvq pack` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..archive import schemes
from ..archive.format import ArchiveHeader, Part, TensorEntry, delta_key, shared_key
from ..archive.parts import encode_part
from ..archive.plan import plan_tensors
from ..archive.writer import ArchiveWriter
from ..errors import UsageError, usage_errors
from ..io.checkpoint import Checkpoint
from ..quant.spec import DEFAULT_GROUP_SIZE, Quantized, QuantSpec
from ..tensors import tensor_bytes
from ..version import __version__
from . import on_grid
from .base import MergeMethod, derive_generator
from .rounding import Rounded, Rounding, RoundingTally
from .sources import Sources

Tensors = Iterator[tuple[str, torch.Tensor | None, torch.Tensor]]


def _common(values: set, what: str, default=None):
    if len(values) == 1:
        return values.pop()
    if not values and default is not None:
        return default
    raise UsageError(f"the inputs use different {what}s ({sorted(values)}): give --{what}")


class ArchiveOutput:
    """Decides the grid and writes the archive, tensor by tensor."""

    def __init__(
        self,
        out: Path,
        method: MergeMethod,
        sources: Sources,
        pretrained: Checkpoint,
        rounding: Rounding,
        bits: int | None = None,
        group_size: int | None = None,
        replace: bool = False,
    ):
        self.out, self.method, self.sources, self.pretrained = out, method, sources, pretrained
        self.replace = replace  # the archive may replace an existing file
        self.float_names = method.ctx.tensor_names
        parts = [p for row in self._input_parts() for p in row if p is not None and p.dense]
        self.bits = bits or _common({p.bits for p in parts}, "bits", None if parts else 0)
        if not self.bits:
            raise UsageError("the inputs hold no tensors quantized at a bit width: give --bits")
        self.group_size = (
            group_size
            if group_size is not None
            else _common({p.group_size for p in parts}, "group-size", DEFAULT_GROUP_SIZE)
        )
        with usage_errors():
            QuantSpec(self.bits, self.group_size)  # validates --bits and --group-size
        self.same_grid = self._same_grid()
        self.rounding = rounding.for_grid(exact_ties=self.same_grid)
        targets = method.ctx.targets
        self.task = sources.tasks[targets[0]] if method.per_task else "merged"
        self.header = self._header()

    def _input_parts(self) -> list[list[Part | None]]:
        """Per float tensor, each selected task's own quantized part (None where exact)."""
        return [
            [ref.own_part(ref.archive.entry(name)) for ref in self.sources.refs]
            for name in self.float_names
        ]

    def _same_grid(self) -> bool:
        """HDRQ's setting: average of FQ archives that quantize every tensor alike."""
        if self.method.name != "average":
            return False
        if any(a.scheme.subtracts_pretrained for a in self.sources.archives):
            return False
        for name in self.float_names:
            entries = {ref.archive.entry(name).kind for ref in self.sources.refs}
            parts = {
                (p.bits, p.group_size, p.dense) if p else None
                for p in (ref.own_part(ref.archive.entry(name)) for ref in self.sources.refs)
            }
            if len(entries) != 1 or len(parts) != 1:
                return False
            part = parts.pop()
            if part is not None and part != (self.bits, self.group_size, True):
                return False
        return True

    def _header(self) -> ArchiveHeader:
        scheme = "fq" if self.same_grid else "tvq"
        (role,) = schemes.get(scheme).roles([self.task])
        part = Part(role, self.bits, self.group_size)
        if self.same_grid:
            first = self.sources.refs[0].archive
            entries = [
                TensorEntry(e.name, e.shape, e.dtype, e.kind, [part] if e.parts else [])
                for e in first.header.tensors
            ]
        else:
            entries = plan_tensors(self.pretrained.specs, [part])
        return ArchiveHeader(
            scheme=scheme,
            tasks=[self.task],
            tool_version=__version__,
            pretrained_fingerprint=self.sources.fingerprint,
            tensors=entries,
        )

    @property
    def grid_text(self) -> str:
        group = "per tensor" if self.group_size == 0 else f"groups of {self.group_size}"
        kind = "the inputs' grid (FQ average)" if self.same_grid else "min-max grid"
        return f"{self.bits}-bit, {group}, {kind}"

    def quantize_tensor(self, entry: TensorEntry, taus: torch.Tensor) -> tuple[Quantized, Rounded]:
        """Codes for one quantized output tensor, and the rounding outcome."""
        generator = derive_generator(self.rounding.seed, entry.name, "rounding")
        if self.same_grid:
            weights = self.method.ctx.weights
            return on_grid.inputs_grid_codes(entry, self.sources, weights, self.rounding, generator)
        merge = on_grid.first_output(self.method, entry.name)
        steps = self.sources.steps(entry.name)
        return on_grid.min_max_codes(entry, taus, merge, steps, self.rounding, generator)

    # --- the whole archive --------------------------------------------------------------------
    def write(self, stream: Tensors) -> tuple[dict, dict]:
        """Write the archive from `stream`, every float tensor's task vectors in model order;
        returns the output and rounding reports."""
        tally = RoundingTally(len(self.sources.refs))
        with ArchiveWriter(self.out, self.header, replace=self.replace) as writer:
            for entry in self.header.tensors:
                if entry.kind == "shared":
                    raw = self.pretrained.load(entry.name)
                    writer.write(shared_key(entry.name), tensor_bytes(raw))
                    continue
                _, _, taus = next(stream)
                if entry.kind == "exact":
                    merged = on_grid.first_output(self.method, entry.name)(taus)
                    merged = merged.to(torch.float32).contiguous()
                    writer.write(delta_key(self.task, entry.name), tensor_bytes(merged))
                    continue
                q, rounded = self.quantize_tensor(entry, taus)
                for key, data in encode_part(entry.parts[0], entry.name, entry.shape, q):
                    writer.write(key, data)
                tally.add(entry.name, rounded)
        rounding = {
            **tally.report(self.rounding),
            "grid": "inputs" if self.same_grid else "min-max",
            "tie_tolerance": None if self.same_grid else self.rounding.tolerance,
        }
        output = {
            "path": str(self.out),
            "format": "tvq",
            "files": [str(self.out)],
            "bytes": self.out.stat().st_size,
            "scheme": self.header.scheme,
            "task": self.task,
            "bits": self.bits,
            "group_size": self.group_size,
            "grid": self.grid_text,
            "targets": [self.task] if self.method.per_task else None,
        }
        return output, rounding
