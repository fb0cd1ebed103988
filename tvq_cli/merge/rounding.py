"""Rounding a merged tensor onto an integer grid: nearest, floor, or HDRQ's noise-sampled
rounding with cosine selection (HDRQ, section 4.3).

- `nearest`: round half to even at the float-domain grid position (HDRQ's eq. 11 with
  round-to-nearest, which is what its paper means, see docs/merge.md).
- `floor`: eq. 11 as printed, `floor(position)` for every value: the baseline HDRQ improves on.
- `noise`: candidate 0 is nearest rounding. Candidates 1..K add noise U(-step_t/2, step_t/2) to
  each input, with its own quantization step, at the ambiguous elements only, merge again and
  round; the noise only decides the direction, so an ambiguous element stays on one of its two
  neighbouring levels. A candidate is scored per input t by

      cos(candidate - x_t, merged - x_t)

  (for two inputs HDRQ's criterion: the way from each input to the merge keeps the direction of
  the interpolation), and the scores are aggregated over inputs by their minimum: the candidate
  whose worst-served input is served best wins, and replaces the current best only when
  strictly better, so the chosen rounding never scores below nearest rounding. For two inputs
  averaged this picks the rounding error most orthogonal to the task difference; the old rule
  (a candidate must improve every input at once, `select="every"`) almost never fires, because
  raising one input's cosine lowers the other's (docs/merge.md derives it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..errors import InternalError, TvqError

ROUNDING_MODES = ("nearest", "floor", "noise")
# Defaults from the measurements in docs/results.md (section 5): noise rounding
# helps where ties are exact (an FQ average on the inputs' grid) and wrote the same codes as
# nearest rounding everywhere else, where it would only cost `samples` extra merges per tensor.
DEFAULT_ON_EXACT_TIES = "noise"
DEFAULT_ELSEWHERE = "nearest"
DEFAULT_SAMPLES = 16
DEFAULT_TIE_TOLERANCE = 0.05
SELECTIONS = ("min", "every")
CHUNK = 1 << 18  # elements per step of the cosine sums
FLOOR_SLACK = 1e-6  # in grid steps: a position that is an integer up to round-off stays on it


@dataclass(frozen=True)
class Rounding:
    """How merged values are put on a grid (checked, defaults filled in)."""

    mode: str | None = None  # None: the default for the grid (`for_grid`)
    samples: int = DEFAULT_SAMPLES
    tolerance: float = DEFAULT_TIE_TOLERANCE
    seed: int = 0
    select: str = "min"  # "every": the earlier rule, kept for the ablation (docs/results.md)
    keep_nearest: bool = True  # False: HDRQ's code, whose first draw stands in for nearest

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in ROUNDING_MODES:
            modes = ", ".join(ROUNDING_MODES)
            raise TvqError(f"--rounding must be one of {modes}, got {self.mode!r}")
        if self.samples < 0:
            raise TvqError(f"--samples must be 0 or more, got {self.samples}")
        if not 0 <= self.tolerance < 0.5:
            raise TvqError(f"--tie-tolerance must be in [0, 0.5), got {self.tolerance}")
        if self.select not in SELECTIONS:
            raise TvqError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.select!r}")

    @classmethod
    def of(
        cls, mode: str | None, samples: int | None, tolerance: float | None, seed: int
    ) -> Rounding:
        """From the request's options (None: the default)."""
        return cls(
            mode,
            DEFAULT_SAMPLES if samples is None else samples,
            DEFAULT_TIE_TOLERANCE if tolerance is None else tolerance,
            seed,
        )

    def for_grid(self, exact_ties: bool) -> Rounding:
        """The rounding with its mode decided: the default depends on whether the grid's
        ambiguous values are exact ties."""
        if self.mode is not None:
            return self
        return replace(self, mode=DEFAULT_ON_EXACT_TIES if exact_ties else DEFAULT_ELSEWHERE)

    @property
    def draws(self) -> int:
        return self.samples if self.mode == "noise" else 0


class Grid(ABC):
    """An integer grid, codes in [low, high]; a subclass says where a value falls (`position`)
    and what a code stands for (`value`)."""

    low: int
    high: int

    @abstractmethod
    def position(self, values: torch.Tensor) -> torch.Tensor:
        """Where each value falls on the grid, in code units."""

    @abstractmethod
    def value(self, codes: torch.Tensor) -> torch.Tensor:
        """What each code stands for."""

    @abstractmethod
    def at(self, where: torch.Tensor) -> Grid:
        """The grid of the elements selected by the mask `where`."""

    def nearest(self, values: torch.Tensor) -> torch.Tensor:
        return torch.round(self.position(values)).clamp_(self.low, self.high)

    def floor(self, values: torch.Tensor) -> torch.Tensor:
        return torch.floor(self.position(values) + FLOOR_SLACK).clamp_(self.low, self.high)

    def ambiguous(self, values: torch.Tensor, tolerance: float) -> torch.Tensor:
        """Values within `tolerance` (in steps) of a midpoint between two levels."""
        position = self.position(values)
        return ((position - torch.floor(position)) - 0.5).abs() <= tolerance


@dataclass
class ScaleGrid(Grid):
    """tvq's grid (archives): x = (code - zero) / scale, codes in [0, high]; one scale and
    zero-point per element."""

    scale: torch.Tensor
    zero: torch.Tensor
    high: int
    low: int = 0

    def position(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.scale + self.zero

    def value(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.zero) / self.scale

    def at(self, where: torch.Tensor) -> ScaleGrid:
        return ScaleGrid(self.scale[where], self.zero[where], self.high, self.low)


@dataclass
class StepGrid(Grid):
    """compressed-tensors' grid: w = (code - zero) * step with signed codes, for values given
    relative to `offset` (task vectors on the grid of `offset + value`, the merged weight).
    The position is computed as the package computes it, so nearest rounding matches it."""

    step: torch.Tensor
    zero: torch.Tensor
    low: int
    high: int
    offset: torch.Tensor

    def position(self, values: torch.Tensor) -> torch.Tensor:
        return (self.offset + values) / self.step + self.zero

    def value(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.zero) * self.step - self.offset

    def at(self, where: torch.Tensor) -> StepGrid:
        return StepGrid(self.step[where], self.zero[where], self.low, self.high, self.offset[where])


@dataclass
class CosineSums:
    """dot(a, b), |a|^2 and |b|^2 per input, so cosines add up over tensors."""

    dot: torch.Tensor
    aa: torch.Tensor
    bb: torch.Tensor

    @classmethod
    def of(cls, candidate: torch.Tensor, merged: torch.Tensor, inputs: torch.Tensor):
        """Sums of `a = candidate - x_t` against `b = merged - x_t`, in float64, over chunks of
        elements (a float64 copy of all T inputs would be 2T times the tensor)."""
        count = inputs.shape[0]
        flat = inputs.reshape(count, -1)
        candidate, merged = candidate.reshape(-1), merged.reshape(-1)
        sums = torch.zeros(3, count, dtype=torch.float64)
        for start in range(0, flat.shape[1], CHUNK):
            part = slice(start, start + CHUNK)
            x = flat[:, part].double()
            a = candidate[part].double() - x
            b = merged[part].double() - x
            sums += torch.stack([(a * b).sum(1), (a * a).sum(1), (b * b).sum(1)])
        return cls(sums[0], sums[1], sums[2])

    def cosines(self) -> torch.Tensor:
        """Per input; NaN where a direction is undefined (a zero vector)."""
        denom = (self.aa * self.bb).sqrt()
        return torch.where(denom > 0, self.dot / denom, torch.full_like(denom, float("nan")))

    def __add__(self, other: CosineSums) -> CosineSums:
        return CosineSums(self.dot + other.dot, self.aa + other.aa, self.bb + other.bb)

    def __sub__(self, other: CosineSums) -> CosineSums:
        return CosineSums(self.dot - other.dot, self.aa - other.aa, self.bb - other.bb)


@dataclass
class Rounded:
    codes: torch.Tensor  # float tensor of integer codes, shape of the merged tensor
    chosen: int | None  # noise: the winning candidate (0: nearest rounding); else None
    changed: bool  # the codes differ from nearest rounding
    values: int
    ambiguous: int
    nearest: CosineSums
    best: CosineSums


@dataclass
class MergedTensor:
    """One merged tensor and what rounding it needs: `inputs` [T, *shape] are the merged inputs
    in the same space as `merged`, `steps` their per-element quantization steps (None: stored
    exact, no noise), and `remerge` the merge applied to perturbed inputs."""

    merged: torch.Tensor
    inputs: torch.Tensor
    steps: list[torch.Tensor | None]
    remerge: Callable[[torch.Tensor], torch.Tensor]


def round_on_grid(
    tensor: MergedTensor,
    grid: Grid,
    ambiguous: torch.Tensor,
    rounding: Rounding,
    generator: torch.Generator,
) -> Rounded:
    """Codes of the merged tensor on `grid` under `rounding`; `ambiguous` marks the elements
    whose direction noise may decide."""
    if rounding.mode is None:
        raise InternalError("the rounding mode is decided by Rounding.for_grid first")
    merged, inputs = tensor.merged, tensor.inputs
    codes = grid.nearest(merged)
    nearest = CosineSums.of(grid.value(codes), merged, inputs)
    result = Rounded(codes, None, False, merged.numel(), int(ambiguous.sum()), nearest, nearest)
    if rounding.mode == "floor":
        result.codes = grid.floor(merged)
        result.best = CosineSums.of(grid.value(result.codes), merged, inputs)
    elif rounding.mode == "noise":
        _sample(result, tensor, grid, ambiguous, rounding, generator)
    result.changed = not torch.equal(result.codes, codes)
    return result


def _sample(
    result: Rounded,
    tensor: MergedTensor,
    grid: Grid,
    ambiguous: torch.Tensor,
    rounding: Rounding,
    generator: torch.Generator,
) -> None:
    """Noise-sampled candidates; the best replaces `result`'s codes (nearest as candidate 0)."""
    result.chosen = 0
    undefined = bool(torch.isnan(result.nearest.cosines()).any())
    if rounding.samples == 0 or result.ambiguous == 0 or undefined:
        return
    merged, inputs = tensor.merged, tensor.inputs
    nearest = result.codes
    position = grid.position(merged)
    low = torch.floor(position).clamp_(grid.low, grid.high)[ambiguous]
    high = (low + 1).clamp_(max=grid.high)
    # candidates differ from nearest only at the ambiguous elements: score those alone
    merged_amb, inputs_amb, grid_amb = merged[ambiguous], inputs[:, ambiguous], grid.at(ambiguous)

    def sums_at(codes: torch.Tensor) -> CosineSums:
        return CosineSums.of(grid_amb.value(codes), merged_amb, inputs_amb)

    rest = result.nearest - sums_at(nearest[ambiguous])
    best = result.nearest.cosines() if rounding.keep_nearest else None
    for k in range(1, rounding.samples + 1):
        noisy = inputs.clone()
        for t, step in enumerate(tensor.steps):
            if step is not None:
                noise = (torch.rand(step.shape, generator=generator) - 0.5) * step
                noisy[t] += noise * ambiguous
        drawn = torch.round(grid.position(tensor.remerge(noisy)))[ambiguous]
        picked = torch.minimum(torch.maximum(drawn, low), high)
        sums = rest + sums_at(picked)
        cos = sums.cosines()
        if best is None or _better(cos, best, rounding.select):
            candidate = nearest.clone()
            candidate[ambiguous] = picked
            result.codes, result.chosen, result.best, best = candidate, k, sums, cos


def _better(cos: torch.Tensor, best: torch.Tensor, select: str) -> bool:
    if select == "every":
        return bool((cos > best).all())
    return bool(cos.min() > best.min())


class RoundingTally:
    """Per-tensor rounding outcomes and the cosines over the whole model, for the report."""

    def __init__(self, inputs: int):
        zero = torch.zeros(inputs, dtype=torch.float64)
        self.nearest = CosineSums(zero, zero, zero)
        self.best = CosineSums(zero, zero, zero)
        self.rows: list[dict] = []

    def add(self, name: str, rounded: Rounded) -> None:
        self.nearest = self.nearest + rounded.nearest
        self.best = self.best + rounded.best
        self.rows.append(
            {
                "name": name,
                "values": rounded.values,
                "ambiguous": rounded.ambiguous,
                "changed": rounded.changed,
                "chosen": rounded.chosen,
                "cosine_nearest": _floats(rounded.nearest.cosines()),
                "cosine_chosen": _floats(rounded.best.cosines()),
            }
        )

    def report(self, rounding: Rounding) -> dict:
        rows = self.rows
        return {
            "mode": rounding.mode,
            "samples": rounding.draws,
            "select": rounding.select if rounding.draws else None,
            "nearest_candidate": rounding.keep_nearest if rounding.draws else None,
            "tensors": len(rows),
            "tensors_changed": sum(1 for r in rows if r["changed"]),
            "values": sum(r["values"] for r in rows),
            "ambiguous": sum(r["ambiguous"] for r in rows),
            "overall": {
                "cosine_nearest": _floats(self.nearest.cosines()),
                "cosine_chosen": _floats(self.best.cosines()),
            },
            "per_tensor": rows,
        }


def _floats(values: torch.Tensor) -> list[float | None] | None:
    out = [None if v != v else float(v) for v in values.tolist()]
    return None if all(v is None for v in out) else out
