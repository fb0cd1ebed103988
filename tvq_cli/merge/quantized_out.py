"""Quantized merge output: the merged task vector as a one-task archive on a B-bit grid.

Two grids:
- "min-max" (general case): a TVQ archive; each tensor's grid is the usual asymmetric
  min-max quantizer of the merged task vector, with --bits and --group-size.
- "inputs" (HDRQ's own setting): `--method average` of FQ archives that share bits and
  groups is written back on the inputs' grid: an FQ archive whose step per group is the
  (weighted) mean of the input steps and whose zero-point is the rounded mean zero-point.
  A value is ambiguous exactly where the mean of the integer codes is a .5 (an odd code sum
  for two inputs).
Ambiguous values are resolved by `rounding.noise_round`; 1-D tensors are stored exact and
non-float tensors are copied, as `tvq pack` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .. import __version__
from ..archive.format import ArchiveHeader, Part, TensorEntry, delta_key, shared_key
from ..archive.parts import encode_part
from ..archive.writer import ArchiveWriter
from ..checkpoint import tensor_bytes
from ..errors import TvqError
from ..pack import DEFAULT_GROUP_SIZE, plan_tensors
from ..quant.quantizer import Quantized, QuantSpec, expand_groups, quantize
from .base import derive_generator
from .rounding import CosineSums, Grid, Rounded, noise_round

if TYPE_CHECKING:
    from .engine import MergeJob

DEFAULT_SAMPLES = 16
DEFAULT_TIE_TOLERANCE = 0.05


def _common(values: set, what: str, default=None):
    if len(values) == 1:
        return values.pop()
    if not values and default is not None:
        return default
    raise TvqError(f"the inputs use different {what}s ({sorted(values)}): give --{what}")


def _input_parts(job: MergeJob) -> list[list[Part | None]]:
    """Per float tensor, each selected task's own quantized part (None where exact)."""
    return [
        [ref.own_part(ref.archive.entry(name)) for ref in job.sources.refs]
        for name in job.float_names
    ]


class ArchiveOutput:
    """Decides the grid and writes the archive, tensor by tensor."""

    def __init__(self, job: MergeJob):
        self.job = job
        request = job.request
        self.rounding = request.rounding or "noise"
        if self.rounding not in ("nearest", "noise"):
            raise TvqError(f"--rounding must be nearest or noise, got {request.rounding!r}")
        self.samples = DEFAULT_SAMPLES if request.samples is None else request.samples
        if self.samples < 0:
            raise TvqError(f"--samples must be 0 or more, got {self.samples}")
        self.tolerance = (
            DEFAULT_TIE_TOLERANCE if request.tie_tolerance is None else request.tie_tolerance
        )
        if not 0 <= self.tolerance < 0.5:
            raise TvqError(f"--tie-tolerance must be in [0, 0.5), got {self.tolerance}")
        parts = [p for row in _input_parts(job) for p in row if p is not None]
        self.bits = request.bits or _common({p.bits for p in parts}, "bits", None if parts else 0)
        if not self.bits:
            raise TvqError("the inputs hold no quantized tensors: give --bits")
        self.group_size = (
            request.group_size
            if request.group_size is not None
            else _common({p.group_size for p in parts}, "group-size", DEFAULT_GROUP_SIZE)
        )
        QuantSpec(self.bits, self.group_size)  # validates
        if job.out.is_dir():
            raise TvqError(f"{job.out}: is a folder; a .tvq output must be a file")
        self.same_grid = self._same_grid()
        method = job.method
        targets = method.ctx.targets
        self.task = job.sources.tasks[targets[0]] if method.per_task else "merged"
        self.header = self._header()

    def _same_grid(self) -> bool:
        """HDRQ's setting: average of FQ archives that quantize every tensor alike."""
        job = self.job
        if job.method.name != "average":
            return False
        if any(a.scheme != "fq" for a in job.sources.archives):
            return False
        for name in job.float_names:
            entries = {ref.archive.entry(name).kind for ref in job.sources.refs}
            parts = {
                (p.bits, p.group_size) if p else None
                for p in (ref.own_part(ref.archive.entry(name)) for ref in job.sources.refs)
            }
            if len(entries) != 1 or len(parts) != 1:
                return False
            part = parts.pop()
            if part is not None and part != (self.bits, self.group_size):
                return False
        return True

    def _header(self) -> ArchiveHeader:
        job = self.job
        scheme = "fq" if self.same_grid else "tvq"
        role = f"{'ft' if self.same_grid else 'task'}:{self.task}"
        part = Part(role, self.bits, self.group_size)
        if self.same_grid:
            first = job.sources.refs[0].archive
            entries = [
                TensorEntry(e.name, e.shape, e.dtype, e.kind, [part] if e.parts else [])
                for e in first.header.tensors
            ]
        else:
            entries = plan_tensors(job.pre.specs, [part])
        return ArchiveHeader(
            scheme=scheme,
            tasks=[self.task],
            tool_version=__version__,
            pretrained_fingerprint=job.sources.fingerprint,
            tensors=entries,
        )

    @property
    def grid_text(self) -> str:
        group = "per tensor" if self.group_size == 0 else f"groups of {self.group_size}"
        kind = "the inputs' grid (FQ average)" if self.same_grid else "min-max grid"
        return f"{self.bits}-bit, {group}, {kind}"

    # --- per tensor ---------------------------------------------------------------------------
    def _merge_fn(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        method = self.job.method

        def run(taus: torch.Tensor) -> torch.Tensor:
            merged = method.merge(name, taus)
            return merged[0] if isinstance(merged, list) else merged

        return run

    def quantize_tensor(self, entry: TensorEntry, taus: torch.Tensor) -> tuple[Quantized, Rounded]:
        """Codes for one quantized output tensor, and the rounding outcome."""
        part = entry.parts[0]
        generator = derive_generator(self.job.request.seed, entry.name, "rounding")
        samples = self.samples if self.rounding == "noise" else 0
        if self.same_grid:
            return self._same_grid_tensor(entry, part, generator, samples)
        merge = self._merge_fn(entry.name)
        merged = merge(taus)
        grid_q = quantize(merged, part.spec)
        grid = self._grid(grid_q.scales, grid_q.zeros, entry, part)
        position = grid.position(merged)
        ambiguous = ((position - torch.floor(position)) - 0.5).abs() <= self.tolerance
        steps = self.job.sources.steps(entry.name)
        rounded = noise_round(merged, taus, steps, merge, grid, ambiguous, samples, generator)
        codes = rounded.codes.to(torch.uint8).reshape(-1)
        return Quantized(codes, grid_q.scales, grid_q.zeros), rounded

    def _grid(
        self, scales: torch.Tensor, zeros: torch.Tensor, entry: TensorEntry, part: Part
    ) -> Grid:
        return Grid(
            expand_groups(scales, entry.shape, part.group_size),
            expand_groups(zeros.to(torch.float32), entry.shape, part.group_size),
            part.spec.levels,
        )

    def _same_grid_tensor(
        self, entry: TensorEntry, part: Part, generator: torch.Generator, samples: int
    ) -> tuple[Quantized, Rounded]:
        """Average of FQ inputs on their own grid: weights, not task vectors, are rounded."""
        weights = self.job.method.ctx.weights
        share = weights / weights.sum()
        codes, steps, inputs = [], [], []
        scales = zeros = None
        for ref, w in zip(self.job.sources.refs, share.tolist(), strict=True):
            own = ref.own_part(ref.archive.entry(entry.name))
            q = ref.archive.quantized(own, ref.archive.entry(entry.name))
            zero = expand_groups(q.zeros.to(torch.float32), entry.shape, own.group_size)
            code = q.codes.reshape(entry.shape).to(torch.float32) - zero
            step = expand_groups(1.0 / q.scales, entry.shape, own.group_size)
            codes.append(code)
            steps.append(step)
            inputs.append(code * step)
            group_step = w / q.scales
            group_zero = w * q.zeros.to(torch.float32)
            scales = group_step if scales is None else scales + group_step
            zeros = group_zero if zeros is None else zeros + group_zero
        out_scales = 1.0 / scales
        out_zeros = torch.round(zeros).clamp_(0, part.spec.levels).to(torch.uint8)
        grid = self._grid(out_scales, out_zeros, entry, part)
        stacked = torch.stack(inputs)

        def merge(values: torch.Tensor) -> torch.Tensor:
            return torch.tensordot(share, values, dims=1)

        mean_code = torch.tensordot(share.double(), torch.stack(codes).double(), dims=1)
        ambiguous = ((mean_code - torch.floor(mean_code)) - 0.5).abs() <= 1e-9
        rounded = noise_round(
            merge(stacked), stacked, steps, merge, grid, ambiguous, samples, generator
        )
        codes_out = rounded.codes.to(torch.uint8).reshape(-1)
        return Quantized(codes_out, out_scales.to(torch.float32), out_zeros), rounded

    # --- the whole archive --------------------------------------------------------------------
    def write(self) -> tuple[dict, dict]:
        job = self.job
        rows: list[dict] = []
        n_inputs = len(job.sources.refs)
        zero = torch.zeros(n_inputs, dtype=torch.float64)
        total_near = CosineSums(zero, zero, zero)
        total_best = CosineSums(zero, zero, zero)
        stream = job.tensors("merge")
        with ArchiveWriter(job.out, self.header) as writer:
            for entry in self.header.tensors:
                if entry.kind == "shared":
                    writer.write(shared_key(entry.name), tensor_bytes(job.pre.load(entry.name)))
                    continue
                _, _, taus = next(stream)
                if entry.kind == "exact":
                    merged = self._merge_fn(entry.name)(taus).to(torch.float32).contiguous()
                    writer.write(delta_key(self.task, entry.name), tensor_bytes(merged))
                    continue
                q, rounded = self.quantize_tensor(entry, taus)
                for key, data in encode_part(entry.parts[0], entry.name, q):
                    writer.write(key, data)
                total_near = total_near + rounded.nearest
                total_best = total_best + rounded.best
                rows.append(
                    {
                        "name": entry.name,
                        "ambiguous": rounded.ambiguous,
                        "chosen": rounded.chosen,
                        "cosine_nearest": _floats(rounded.nearest.cosines()),
                        "cosine_chosen": _floats(rounded.best.cosines()),
                    }
                )
        rounding = {
            "mode": self.rounding,
            "samples": self.samples if self.rounding == "noise" else 0,
            "grid": "inputs" if self.same_grid else "min-max",
            "tie_tolerance": None if self.same_grid else self.tolerance,
            "tensors": len(rows),
            "tensors_changed": sum(1 for r in rows if r["chosen"] != 0),
            "ambiguous": sum(r["ambiguous"] for r in rows),
            "overall": {
                "cosine_nearest": _floats(total_near.cosines()),
                "cosine_chosen": _floats(total_best.cosines()),
            },
            "per_tensor": rows,
        }
        output = {
            "path": str(job.out),
            "format": "tvq",
            "files": [str(job.out)],
            "bytes": job.out.stat().st_size,
            "scheme": self.header.scheme,
            "task": self.task,
            "bits": self.bits,
            "group_size": self.group_size,
            "grid": self.grid_text,
            "targets": [self.task] if job.method.per_task else None,
        }
        return output, rounding


def _floats(values: torch.Tensor) -> list[float | None] | None:
    out = [None if v != v else float(v) for v in values.tolist()]
    return None if all(v is None for v in out) else out
