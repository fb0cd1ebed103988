"""Running a merge: check everything, stream the statistics passes, then write the output.

Every check (archives, fingerprint, method, options, output path) happens before a byte is
written; the output itself is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checkpoint import ST_TO_TORCH, TORCH_TO_ST, Checkpoint, TensorSpec
from ..errors import TvqError
from ..output import DEFAULT_MAX_SHARD, ModelWriter, atomic_output, check_target, parse_size
from .base import MergeContext, MergeMethod, method_class, parse_weights
from .quantized_out import ArchiveOutput
from .sources import Sources

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class MergeRequest:
    """Everything `tvq merge` takes; see docs/merge.md."""

    archives: list[Path | str]
    pretrained: Path | str
    out: Path | str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] | None = None
    weights: str | list[float] | None = None
    seed: int = 0
    dtype: str | None = None
    task: str | None = None
    all_tasks: bool = False
    force: bool = False  # overwrite an existing output; merge despite a fingerprint mismatch
    max_shard_size: int | str = DEFAULT_MAX_SHARD
    bits: int | None = None
    group_size: int | None = None
    rounding: str | None = None
    samples: int | None = None
    tie_tolerance: float | None = None

    @property
    def quantized(self) -> bool:
        return Path(self.out).suffix == ".tvq"


QUANTIZED_ONLY = ("bits", "group_size", "rounding", "samples", "tie_tolerance")


class MergeJob:
    """A checked merge, ready to run."""

    def __init__(self, request: MergeRequest, progress: bool = False):
        self.request = request
        self.progress = progress
        self.out = Path(request.out)
        self.pre = Checkpoint(request.pretrained)
        self.sources = Sources(request.archives, self.pre, request.tasks, request.force)
        tasks = self.sources.tasks
        cls = method_class(request.method)
        weights = _weights(request.weights, len(tasks))
        if weights is not None and not cls.takes_weights:
            raise TvqError(f"method {cls.name} does not take --weights")
        self.float_names = [n for n, s in self.pre.specs.items() if s.is_float]
        ctx = MergeContext(
            tasks=tasks,
            weights=weights if weights is not None else torch.ones(len(tasks)),
            tensor_names=self.float_names,
            seed=request.seed,
            targets=self._targets(cls, tasks),
        )
        self.method: MergeMethod = cls(dict(request.options), ctx)
        self.weights_given = weights is not None
        self._check_output_options()
        self.max_shard = parse_size(request.max_shard_size)
        check_target(self.out, request.force, self._inputs())

    def _targets(self, cls: type[MergeMethod], tasks: list[str]) -> list[int]:
        request = self.request
        if not cls.per_task:
            if request.task is not None or request.all_tasks:
                raise TvqError(f"--task and --all-tasks apply to per-task methods, not {cls.name}")
            return []
        if request.task is not None and request.all_tasks:
            raise TvqError("give either --task NAME or --all-tasks, not both")
        if request.all_tasks:
            return list(range(len(tasks)))
        if request.task is None:
            raise TvqError(
                f"{cls.name} builds one model per task: give --task NAME or --all-tasks "
                f"(tasks: {', '.join(tasks)})"
            )
        if request.task not in tasks:
            raise TvqError(f"--task {request.task!r} is not a merged task ({', '.join(tasks)})")
        return [tasks.index(request.task)]

    def _check_output_options(self) -> None:
        request = self.request
        if request.dtype is not None and request.dtype not in DTYPES:
            raise TvqError(f"--dtype must be fp32, fp16 or bf16, got {request.dtype!r}")
        if request.quantized:
            if request.dtype is not None:
                raise TvqError("--dtype applies to model outputs, not to a .tvq archive")
            if request.all_tasks:
                raise TvqError("a .tvq output holds one merged task vector: use --task NAME")
            return
        given = [o for o in QUANTIZED_ONLY if getattr(request, o) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise TvqError(f"{flag} applies only to a quantized output (--out NAME.tvq)")

    def _inputs(self) -> list[Path]:
        paths = [Path(self.request.pretrained), *self.pre.files]
        return paths + [a.path for a in self.sources.archives]

    # --- running ------------------------------------------------------------------------------
    def tensors(self, desc: str) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, pretrained fp32, task vectors [T, ...]) for every float tensor, in order."""
        bar = tqdm(
            self.float_names, desc=desc, unit="tensor", disable=not self.progress, file=sys.stderr
        )
        for name in bar:
            base = self.pre.load_float(name)
            yield name, base, self.sources.task_vectors(name, base)

    def run_statistics(self) -> None:
        for index in range(self.method.stat_passes):
            for name, _, taus in self.tensors(f"statistics {index + 1}"):
                self.method.observe(index, name, taus)
            self.method.end_pass(index)

    def output_specs(self) -> dict[str, TensorSpec]:
        dtype = self.request.dtype
        specs = {}
        for name, spec in self.pre.specs.items():
            if spec.is_float and dtype is not None:
                spec = TensorSpec(spec.shape, TORCH_TO_ST[DTYPES[dtype]])
            specs[name] = spec
        return specs

    def write_models(self) -> dict:
        """Write one model (or one per target task) and describe what was written."""
        specs = self.output_specs()
        torch_dtypes = {n: ST_TO_TORCH[s.dtype] for n, s in specs.items()}
        pre_is_folder = self.pre.path.is_dir()
        per_task = self.method.per_task and self.request.all_tasks
        folder = per_task or self.out.suffix != ".safetensors"
        with atomic_output(self.out, folder=folder) as staged:
            if per_task:
                staged.mkdir()
                paths = [
                    staged / (t if pre_is_folder else f"{t}.safetensors")
                    for t in self._target_names()
                ]
                as_folder = pre_is_folder
            else:
                paths, as_folder = [staged], folder
            writers = [
                ModelWriter(
                    p,
                    specs,
                    folder=as_folder,
                    max_shard_bytes=self.max_shard,
                    copy_from=self.pre.path if pre_is_folder and as_folder else None,
                )
                for p in paths
            ]
            try:
                float_names = set(self.float_names)
                stream = self.tensors("merge")
                for name in self.pre.names:
                    if name not in float_names:
                        raw = self.pre.load(name)
                        for writer in writers:
                            writer.write(name, raw)
                        continue
                    _, base, taus = next(stream)
                    merged = self.method.merge(name, taus)
                    deltas = merged if isinstance(merged, list) else [merged]
                    for writer, delta in zip(writers, deltas, strict=True):
                        writer.write(name, (base + delta).to(torch_dtypes[name]))
                for writer in writers:
                    writer.finish()
            except BaseException:
                for writer in writers:
                    writer.abort()
                raise
        files = [self.out / f.relative_to(staged) for w in writers for f in w.files]
        return {
            "path": str(self.out),
            "format": "folder" if folder else "safetensors",
            "files": [str(f) for f in files],
            "bytes": sum(f.stat().st_size for f in files),
            "dtype": self.request.dtype or "as pretrained",
            "targets": self._target_names() if self.method.per_task else None,
        }

    def _target_names(self) -> list[str]:
        return [self.sources.tasks[i] for i in self.method.ctx.targets]

    def report(self, output: dict, seconds: float, rounding: dict | None = None) -> dict:
        return {
            "method": self.method.name,
            "formula": self.method.formula,
            "tasks": self.sources.tasks,
            "archives": [str(a.path) for a in self.sources.archives],
            "coefficients": self.method.coefficients(),
            "weights": self.method.ctx.weights.tolist() if self.weights_given else None,
            "seed": self.request.seed,
            "fingerprint_mismatch": self.sources.mismatched,
            "output": output,
            "rounding": rounding,
            "seconds": seconds,
        }


def _weights(weights: str | list[float] | None, n: int) -> torch.Tensor | None:
    if weights is None or isinstance(weights, str):
        return parse_weights(weights, n)
    return parse_weights(",".join(str(w) for w in weights), n)


def run_merge(request: MergeRequest, progress: bool = False) -> dict:
    """Check, merge and write; returns the report (schema in docs/merge.md)."""
    start = time.perf_counter()
    job = MergeJob(request, progress)
    if request.quantized:
        archive_output = ArchiveOutput(job)  # checks the quantized-output options first
        job.run_statistics()
        output, rounding = archive_output.write()
        return job.report(output, time.perf_counter() - start, rounding)
    job.run_statistics()
    output = job.write_models()
    return job.report(output, time.perf_counter() - start)
