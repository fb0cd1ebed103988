"""The merge-method interface, the registry of methods by name, and option validation.

A method turns the stacked task vectors of one tensor, ``taus`` of shape [T, *shape], into the
merged task vector that is added to the pretrained tensor. Methods that need a whole-model
statistic (TIES' global top-k threshold, EMR's rescalers) declare `stat_passes`: the engine
streams every float tensor through `observe` that many times before merging, so no method ever
holds more than one tensor's task vectors. Methods that build one model per task (TALL, EMR)
set `per_task` and return one tensor per target task.

Every coefficient is an `Option` with its reference default; unknown options, options the
method does not take and out-of-range values are usage errors, never silently ignored.
"""

from __future__ import annotations

import hashlib
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InternalError, UsageError

if TYPE_CHECKING:
    import torch

    from ..quant.kernel import CodedTasks


@dataclass(frozen=True)
class Option:
    """One coefficient: its CLI flag is `--` + name with '_' as '-'."""

    name: str
    default: Any  # a value, or a callable(method) -> value for defaults that depend on others
    help: str
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    default_text: str = ""  # how a computed default is shown, e.g. "1/T"

    @property
    def shown_default(self) -> Any:
        return self.default_text or self.default

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, method: str) -> Any:
        where = f"{method}: {self.flag}"
        if self.choices:
            if value not in self.choices:
                raise UsageError(f"{where} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        try:
            number = self.kind(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where} expects a number, got {value!r}") from None
        if self.kind is int and number != float(value):
            raise UsageError(f"{where} expects a whole number, got {value!r}")
        if not math.isfinite(number):
            raise UsageError(f"{where} must be finite, got {value!r}")
        too_low = self.low is not None and (
            number <= self.low if self.low_open else number < self.low
        )
        too_high = self.high is not None and (
            number >= self.high if self.high_open else number > self.high
        )
        if too_low or too_high:
            lo = "(" if self.low_open else "["
            hi = ")" if self.high_open else "]"
            span = f"{lo}{_num(self.low, '-inf')}, {_num(self.high, 'inf')}{hi}"
            raise UsageError(f"{where} must be in {span}, got {value}")
        return number


def _num(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value:g}"


@dataclass
class MergeContext:
    """What a method may know about the merge besides the task vectors themselves."""

    tasks: list[str]
    weights: torch.Tensor  # one per task; all ones unless --weights
    tensor_names: list[str]  # the float tensors, in model order
    seed: int = 0
    targets: list[int] = field(default_factory=list)  # per-task methods: which task models

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)


class MergeMethod(ABC):
    """Base class: subclasses set the class attributes and implement `merge`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    formula: ClassVar[str]
    paper: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    takes_weights: ClassVar[bool] = False
    per_task: ClassVar[bool] = False

    def __init__(self, values: dict[str, Any], ctx: MergeContext):
        self.ctx = ctx
        known = {o.name: o for o in self.options}
        for key in values:
            if key not in known:
                flags = ", ".join(o.flag for o in self.options) or "no options"
                raise UsageError(
                    f"method {self.name} does not take --{key.replace('_', '-')} "
                    f"(it takes: {flags})"
                )
        self.values: dict[str, Any] = {}
        for option in self.options:  # defaults may depend on earlier options
            if option.name in values:
                self.values[option.name] = option.check(values[option.name], self.name)
            else:
                default = option.default
                self.values[option.name] = default(self) if callable(default) else default
        self.validate()

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Checks that involve several options or the number of tasks."""

    @property
    def stat_passes(self) -> int:
        return 0

    @property
    def elementwise(self) -> bool:
        """True when `observe` and `merge` may be given any columns of the flattened task
        vectors ([T, block]) and give, block by block, what they give on the whole tensor;
        the engine then runs them on cache-sized blocks in parallel (so `observe` must be
        thread-safe)."""
        return False

    @property
    def merges_codes(self) -> bool:
        """Whether `merge_codes` takes task vectors kept as codes (a native fast path)."""
        return False

    def merge_codes(
        self, name: str, coded: CodedTasks, first: int, base: torch.Tensor, out: torch.Tensor
    ) -> bool:
        """Elements [first, first + len(out)) of the merged model: ``out = base + merged``
        rounded to out's dtype, straight from coded task vectors, with the values `merge`
        gives (`quant.kernel.coded_merge_into`); returns whether `base` is finite. Called
        only where `merges_codes`."""
        raise InternalError(f"{self.name} says it merges codes but has no merge_codes")

    def observe(self, pass_index: int, name: str, taus: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """See one tensor's task vectors during statistics pass `pass_index`. Elementwise
        methods see column blocks as a `stream.TaskBlock` (`.values` is the [T, block]
        tensor; `block[t]` one task's columns, which `topk.StreamingKth` counts from the
        codes), others the whole [T, *shape] tensor."""

    def end_pass(self, pass_index: int) -> None:  # noqa: B027 - optional hook
        """All tensors have been observed in pass `pass_index`."""

    @abstractmethod
    def merge(self, name: str, taus: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The merged task vector of one tensor (per-task methods: one per target)."""

    def coefficients(self) -> dict[str, Any]:
        """The resolved coefficients, for the report."""
        return dict(self.values)

    # --- helpers shared by methods -----------------------------------------------------------
    def weighted_sum(self, taus: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """scale * sum_t w_t tau_t, summed in task order (`quant.kernel.weighted_sum`)."""
        from ..quant.kernel import weighted_sum

        return weighted_sum(taus, self.ctx.weights, scale)

    def rng(self, name: str, task: str, stream: str) -> torch.Generator:
        """A generator seeded by (seed, tensor, task, purpose): reproducible in any order."""
        return derive_generator(self.ctx.seed, name, task, stream)


def derive_generator(seed: int, *keys: str) -> torch.Generator:
    """A torch generator seeded from --seed and names, independent of processing order."""
    import torch

    text = "\0".join([str(seed), *keys]).encode()
    derived = int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator().manual_seed(derived)


def broadcast(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Weights of shape [T] viewed as [T, 1, 1, ...] to multiply a [T, *shape] stack."""
    return weights.reshape(-1, *([1] * (like.dim() - 1)))


REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available by its name."""
    if not re.fullmatch(r"[a-z_]+", cls.name) or cls.name in REGISTRY:
        raise ValueError(f"bad or duplicate merge method name {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def parse_weights(text: str | None, n_tasks: int) -> torch.Tensor | None:
    """`--weights 1,0.5,2` into a tensor (None when not given)."""
    import torch

    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights expects numbers separated by commas, got {text!r}") from None
    if len(values) != n_tasks:
        raise UsageError(f"--weights has {len(values)} values for {n_tasks} tasks")
    if not all(math.isfinite(v) for v in values):
        raise UsageError("--weights must be finite numbers")
    return torch.tensor(values, dtype=torch.float32)
