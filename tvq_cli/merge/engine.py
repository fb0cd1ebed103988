"""Running a merge: check everything, stream the statistics passes, then write the output.

Every check (archives, fingerprint, method, options, output path) happens before a byte is
written; the output itself is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checkpoint import ST_TO_TORCH, TORCH_TO_ST, Checkpoint, TensorSpec, all_finite
from ..errors import TvqError
from ..output import DEFAULT_MAX_SHARD, ModelWriter, atomic_output, check_target, parse_size
from ..pipeline import Writer, default_threads, fixed_mmap_threshold, torch_threads
from .base import MergeContext, MergeMethod, method_class, parse_weights
from .quantized_out import ArchiveOutput
from .sources import Sources
from .stream import BlockRunner, TaskVectorBuffer, column_blocks, decode_into

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
    threads: int | None = None  # worker threads; default: every core this process may use

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
        self.threads = _threads(request.threads)
        check_target(self.out, request.force, self._inputs())
        largest = max((self.pre.specs[n].numel for n in self.float_names), default=1)
        self.buffer = TaskVectorBuffer(len(tasks), largest)
        self.runner = BlockRunner(self.threads)

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
    def _bar(self, desc: str) -> tqdm:
        return tqdm(
            total=len(self.float_names),
            desc=desc,
            unit="tensor",
            disable=not self.progress,
            file=sys.stderr,
        )

    def decode(self, name: str, base: torch.Tensor | None) -> torch.Tensor:
        """Every selected task's fp32 task vector of `name`, decoded in parallel into the
        shared buffer: [T, numel], valid until the next call."""
        rows = self.buffer.rows(self.pre.specs[name].numel)
        self.runner.map(
            lambda t: decode_into(self.sources, t, name, base, rows[t]), list(range(len(rows)))
        )
        return rows

    def _stacked(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(rows.shape[0], *self.pre.specs[name].shape)

    def tensors(self, desc: str) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor]]:
        """(name, pretrained fp32 or None when not needed, task vectors [T, ...]) for every
        float tensor, in order; the task vectors are valid until the next item."""
        with self._bar(desc) as bar:
            for name in self.float_names:
                base = self.pre.load_float(name) if self.sources.needs_pretrained else None
                yield name, base, self._stacked(name, self.decode(name, base))
                bar.update()

    def run_statistics(self) -> None:
        blocked = self.method.elementwise
        for index in range(self.method.stat_passes):
            for name, _, taus in self.tensors(f"statistics {index + 1}"):
                if blocked:
                    self._observe_blocks(index, name, taus.view(taus.shape[0], -1))
                else:
                    self.method.observe(index, name, taus)
            self.method.end_pass(index)

    def _observe_blocks(self, index: int, name: str, flat: torch.Tensor) -> None:
        self.runner.map(
            lambda s: self.method.observe(index, name, flat[:, s]), column_blocks(flat.shape[1])
        )

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
                self._stream_models(writers, torch_dtypes)
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

    def _stream_models(self, writers: list[ModelWriter], dtypes: dict[str, torch.dtype]) -> None:
        """Merge and write every tensor in file order: the next pretrained tensor is read while
        the current one is merged, and the previous one is written meanwhile."""
        names = self.pre.names
        float_names = set(self.float_names)
        bar = self._bar("merge")
        blocked = self.method.elementwise and not self.method.per_task
        largest = max(
            (self.pre.specs[n].numel * torch.finfo(dtypes[n]).bits // 8 for n in self.float_names),
            default=1,
        )
        outs = [torch.empty(largest, dtype=torch.uint8) for _ in range(2 if blocked else 0)]
        reader = ThreadPoolExecutor(1, thread_name_prefix="tvq-read")
        writer = Writer()
        try:
            pending = reader.submit(self.pre.load, names[0]) if names else None
            for i, name in enumerate(names):
                raw = pending.result()
                if i + 1 < len(names):
                    pending = reader.submit(self.pre.load, names[i + 1])
                if name not in float_names:
                    outputs = [raw] * len(writers)
                else:
                    bar.update()
                    if blocked:
                        out = outs[i % 2][: raw.numel() * torch.finfo(dtypes[name]).bits // 8]
                        outputs = [self._merge_blocks(name, raw, out.view(dtypes[name]))]
                    else:
                        outputs = self._merge_whole(name, raw, dtypes[name])
                writer.submit(
                    lambda name=name, outputs=outputs: [
                        w.write(name, t) for w, t in zip(writers, outputs, strict=True)
                    ]
                )
            writer.wait()
        finally:
            bar.close()
            writer.close()
            reader.shutdown(wait=True, cancel_futures=True)
        for w in writers:
            w.finish()

    def _pretrained_float(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        base = raw.to(torch.float32)
        if not all_finite(base):
            raise TvqError(f"{self.pre.path}: tensor {name} contains NaN or Inf")
        return base

    def _merge_whole(self, name: str, raw: torch.Tensor, dtype: torch.dtype) -> list:
        base = self._pretrained_float(name, raw)
        taus = self._stacked(name, self.decode(name, base))
        merged = self.method.merge(name, taus)
        deltas = merged if isinstance(merged, list) else [merged]
        return [(base + delta).to(dtype) for delta in deltas]

    def _merge_blocks(self, name: str, raw: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """An elementwise method on column blocks: the same values as on the whole tensor."""
        base_flat = raw.reshape(-1)
        taus = self.decode(
            name, None if not self.sources.needs_pretrained else self._pretrained_float(name, raw)
        )

        def block(s: slice) -> None:
            base = self._pretrained_float(name, base_flat[s])
            out[s] = base.add_(self.method.merge(name, taus[:, s]))

        self.runner.map(block, column_blocks(taus.shape[1]))
        return out.view(raw.shape)

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


def _threads(threads: int | None) -> int:
    """pack's semantics: default every core this process may use, at least 1."""
    if threads is None:
        return default_threads()
    if threads < 1:
        raise TvqError(f"--threads must be at least 1, got {threads}")
    return threads


def _weights(weights: str | list[float] | None, n: int) -> torch.Tensor | None:
    if weights is None or isinstance(weights, str):
        return parse_weights(weights, n)
    return parse_weights(",".join(str(w) for w in weights), n)


def run_merge(request: MergeRequest, progress: bool = False) -> dict:
    """Check, merge and write; returns the report (schema in docs/merge.md)."""
    start = time.perf_counter()
    job = MergeJob(request, progress)
    fixed_mmap_threshold()
    # blocks run on the job's own threads; whole-tensor methods keep torch's intra-op threads
    intra_op = 1 if job.method.elementwise else job.threads
    try:
        with torch_threads(intra_op):
            if request.quantized:
                archive_output = ArchiveOutput(job)  # checks the quantized-output options first
                job.run_statistics()
                output, rounding = archive_output.write()
                return job.report(output, time.perf_counter() - start, rounding)
            job.run_statistics()
            output = job.write_models()
            return job.report(output, time.perf_counter() - start)
    finally:
        job.runner.close()
