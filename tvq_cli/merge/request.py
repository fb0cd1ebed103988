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
from ..errors import TvqError
from ..io.atomic import check_target
from ..io.checkpoint import Checkpoint
from ..io.model_writer import DEFAULT_MAX_SHARD, parse_size
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
    def float_names(self) -> list[str]:
        return self.method.ctx.tensor_names

    @property
    def target_names(self) -> list[str]:
        """Per-task methods: the tasks whose models are written."""
        return [self.sources.tasks[i] for i in self.method.ctx.targets]


def check_request(request: MergeRequest) -> Merge:
    """Open and check everything a merge needs; raises TvqError on the first problem."""
    pre = Checkpoint(request.pretrained)
    sources = Sources(request.archives, pre, request.tasks, request.force)
    tasks = sources.tasks
    cls = method_class(request.method)
    weights = _weights(request.weights, len(tasks))
    if weights is not None and not cls.takes_weights:
        raise TvqError(f"method {cls.name} does not take --weights")
    ctx = MergeContext(
        tasks=tasks,
        weights=weights if weights is not None else torch.ones(len(tasks)),
        tensor_names=[n for n, s in pre.specs.items() if s.is_float],
        seed=request.seed,
        targets=_targets(request, cls, tasks),
    )
    method = cls(dict(request.options), ctx)
    _check_output_options(request)
    out = Path(request.out)
    max_shard = parse_size(request.max_shard_size)
    threads = check_threads(request.threads)
    inputs = [Path(request.pretrained), *pre.files, *(a.path for a in sources.archives)]
    check_target(out, request.force, inputs)
    if request.quantized:
        sources.check_fingerprint(pre.fingerprint())
    return Merge(request, out, pre, sources, method, weights is not None, threads, max_shard)


def _targets(request: MergeRequest, cls: type[MergeMethod], tasks: list[str]) -> list[int]:
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


def _check_output_options(request: MergeRequest) -> None:
    if request.dtype is not None and request.dtype not in OUTPUT_DTYPES:
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


def _weights(weights: str | list[float] | None, n: int) -> torch.Tensor | None:
    if weights is None or isinstance(weights, str):
        return parse_weights(weights, n)
    return parse_weights(",".join(str(w) for w in weights), n)
