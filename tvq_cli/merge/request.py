"""What a merge asks for (`MergeRequest`) and its validation into a `Merge` ready to run.

Every check (archives, method, options, output path) happens here, before a byte is read for
merging or written. The pretrained fingerprint is checked here for archive outputs; a merged
model reads every pretrained tensor once anyway, so it is fingerprinted as it is read
(`model_out`) and checked before the output appears: on a mismatch nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..concurrency import check_threads
from ..dtypes import OUTPUT_DTYPES
from ..errors import UsageError, usage_errors
from ..io.checkpoint import Checkpoint
from ..io.model_writer import DEFAULT_MAX_SHARD, parse_size
from ..io.target import check_target
from .base import MergeContext, MergeMethod, parse_weights
from .methods import method_class
from .sources import Sources


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
    force: bool = False  # replace an existing output (a folder only if tvq wrote it)
    allow_different_base: bool = False  # merge archives packed against another pretrained
    max_shard_size: int | str = DEFAULT_MAX_SHARD
    bits: int | None = None
    group_size: int | None = None
    rounding: str | None = None
    samples: int | None = None
    tie_tolerance: float | None = None
    threads: int | None = None  # worker threads; default: every core this process may use
    quantize: str | None = None  # "w4" / "w8": a compressed-tensors (pack-quantized) folder
    symmetric: bool | None = None
    quantize_ignore: list[str] | None = None  # module-name globs kept in full precision
    ray: str | None = None  # "local" or a Ray address: the folder's shards merged in Ray tasks

    @property
    def writes_archive(self) -> bool:
        """A quantized one-task .tvq archive."""
        return Path(self.out).suffix == ".tvq"

    @property
    def writes_packed(self) -> bool:
        """A model folder with packed integer weights (`--quantize`)."""
        return self.quantize is not None

    @property
    def folder_output(self) -> bool:
        """A model folder (or a folder of one model per task), not one file."""
        suffix = Path(self.out).suffix
        return not self.writes_archive and (self.all_tasks or suffix != ".safetensors")


ON_GRID = ("group_size", "rounding", "samples", "tie_tolerance")  # any quantized output
ARCHIVE_ONLY = ("bits",)
PACKED_ONLY = ("symmetric", "quantize_ignore")


@dataclass
class Merge:
    """A checked merge: its inputs opened, its method built, its output allowed."""

    request: MergeRequest
    out: Path
    pretrained: Checkpoint
    sources: Sources
    method: MergeMethod
    weights_given: bool
    threads: int
    max_shard: int

    @property
    def inputs(self) -> list[Path]:
        """Every file the merge reads: never an output."""
        pre = Path(self.request.pretrained)
        return [pre, *self.pretrained.files, *(a.path for a in self.sources.archives)]

    @property
    def float_names(self) -> list[str]:
        return self.method.ctx.tensor_names

    @property
    def target_names(self) -> list[str]:
        """Per-task methods: the tasks whose models are written."""
        return [self.sources.tasks[i] for i in self.method.ctx.targets]


def check_request(request: MergeRequest) -> Merge:
    """Open and check everything a merge needs; raises TvqError on the first problem, and
    checks what the command line alone decides (`UsageError`s) before reading a file."""
    merge = open_merge(request)
    check_target(merge.out, request.force, merge.inputs, request.folder_output)
    if request.writes_archive or request.writes_packed:
        merge.sources.check_fingerprint(merge.pretrained.fingerprint())
    return merge


def open_merge(request: MergeRequest) -> Merge:
    """The merge `request` asks for, its inputs opened and checked, its output not (a worker
    of a distributed merge writes into a folder the driver checked)."""
    cls = method_class(request.method)
    _check_output_options(request)
    _check_task_flags(request, cls)
    with usage_errors():
        max_shard = parse_size(request.max_shard_size)
    threads = check_threads(
        1 if request.ray is not None and request.threads is None else request.threads
    )
    pre = Checkpoint(request.pretrained)
    sources = Sources(request.archives, pre, request.tasks, request.allow_different_base)
    tasks = sources.tasks
    weights = _weights(request.weights, len(tasks))
    if weights is not None and not cls.takes_weights:
        raise UsageError(f"method {cls.name} does not take --weights")
    ctx = MergeContext(
        tasks=tasks,
        weights=weights if weights is not None else torch.ones(len(tasks)),
        tensor_names=[n for n, s in pre.specs.items() if s.is_float],
        seed=request.seed,
        targets=_targets(request, cls, tasks),
    )
    with usage_errors():  # the method checks its coefficients
        method = cls(dict(request.options), ctx)
    return Merge(
        request, Path(request.out), pre, sources, method, weights is not None, threads, max_shard
    )


def _check_task_flags(request: MergeRequest, cls: type[MergeMethod]) -> None:
    """--task and --all-tasks: for per-task methods, one of them."""
    if not cls.per_task:
        if request.task is not None or request.all_tasks:
            raise UsageError(f"--task and --all-tasks apply to per-task methods, not {cls.name}")
    elif request.task is not None and request.all_tasks:
        raise UsageError("give either --task NAME or --all-tasks, not both")
    elif request.task is None and not request.all_tasks:
        raise UsageError(f"{cls.name} builds one model per task: give --task NAME or --all-tasks")


def _targets(request: MergeRequest, cls: type[MergeMethod], tasks: list[str]) -> list[int]:
    if not cls.per_task:
        return []
    if request.all_tasks:
        return list(range(len(tasks)))
    if request.task not in tasks:
        raise UsageError(f"--task {request.task!r} is not a merged task ({', '.join(tasks)})")
    return [tasks.index(request.task)]


def _check_output_options(request: MergeRequest) -> None:
    if request.ray is not None:
        if request.writes_archive or request.writes_packed or request.all_tasks:
            raise UsageError("--ray writes one dense model: not a .tvq, --quantize or --all-tasks")
        if not request.folder_output:
            raise UsageError("--ray writes the shards of a model folder: give --out a folder")
    if request.dtype is not None and request.dtype not in OUTPUT_DTYPES:
        raise UsageError(f"--dtype must be fp32, fp16 or bf16, got {request.dtype!r}")
    if request.writes_archive:
        if request.writes_packed:
            raise UsageError("--quantize writes a model folder: give --out a folder name, not .tvq")
        if request.dtype is not None:
            raise UsageError("--dtype applies to model outputs, not to a .tvq archive")
        if request.all_tasks:
            raise UsageError("a .tvq output holds one merged task vector: use --task NAME")
        _refuse(request, PACKED_ONLY, "a --quantize output")
        return
    if request.writes_packed:
        if Path(request.out).suffix == ".safetensors":
            raise UsageError("--quantize writes a model folder: give --out a folder name")
        if request.all_tasks:
            raise UsageError("--quantize writes one model: use --task NAME")
        _refuse(request, ARCHIVE_ONLY, "a .tvq output (--quantize w4|w8 sets the bits)")
        return
    _refuse(request, ON_GRID + ARCHIVE_ONLY, "a quantized output (--out NAME.tvq or --quantize)")
    _refuse(request, PACKED_ONLY, "a --quantize output")


def _refuse(request: MergeRequest, options: tuple[str, ...], where: str) -> None:
    given = [o for o in options if getattr(request, o) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"{flag} applies only to {where}")


def _weights(weights: str | list[float] | None, n: int) -> torch.Tensor | None:
    if weights is None or isinstance(weights, str):
        return parse_weights(weights, n)
    return parse_weights(",".join(str(w) for w in weights), n)
