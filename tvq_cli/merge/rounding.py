"""Noise-sampled rounding of a merged tensor onto an integer grid (HDRQ, section 4.3).

A merged value that falls on (or near) the midpoint between two grid levels has no natural
rounding direction: averaging two codes gives an exact .5 tie whenever their sum is odd.
Candidate 0 is nearest rounding. Candidates 1..K add noise U(-step_t/2, step_t/2) to each
input, with its own quantization step, at the ambiguous elements only, merge again and round;
the noise only decides the direction, so an ambiguous element stays on one of its two
neighbouring levels. Each candidate is scored per input t by

    cos(candidate - x_t, merged - x_t)

(for two inputs, HDRQ's criterion: the way from each input to the merge keeps the direction
of the interpolation). A candidate replaces the current best only if it improves the cosine
for every input, so the chosen rounding never scores below nearest rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Grid:
    """An output grid, one scale and zero-point per element: x = (code - zero) / scale."""

    scale: torch.Tensor
    zero: torch.Tensor
    levels: int

    def position(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.scale + self.zero

    def nearest(self, values: torch.Tensor) -> torch.Tensor:
        return torch.round(self.position(values)).clamp_(0, self.levels)

    def value(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.zero) / self.scale


@dataclass
class CosineSums:
    """dot(a, b), |a|^2 and |b|^2 per input, so cosines add up over tensors."""

    dot: torch.Tensor
    aa: torch.Tensor
    bb: torch.Tensor

    @classmethod
    def of(cls, candidate: torch.Tensor, merged: torch.Tensor, inputs: torch.Tensor):
        a = (candidate.unsqueeze(0) - inputs).reshape(inputs.shape[0], -1).double()
        b = (merged.unsqueeze(0) - inputs).reshape(inputs.shape[0], -1).double()
        return cls((a * b).sum(1), (a * a).sum(1), (b * b).sum(1))

    def cosines(self) -> torch.Tensor:
        """Per input; NaN where a direction is undefined (a zero vector)."""
        denom = (self.aa * self.bb).sqrt()
        return torch.where(denom > 0, self.dot / denom, torch.full_like(denom, float("nan")))

    def __add__(self, other: CosineSums) -> CosineSums:
        return CosineSums(self.dot + other.dot, self.aa + other.aa, self.bb + other.bb)


@dataclass
class Rounded:
    codes: torch.Tensor  # float tensor of integer codes, shape of the merged tensor
    chosen: int  # 0: nearest rounding
    ambiguous: int
    nearest: CosineSums
    best: CosineSums


def noise_round(
    merged: torch.Tensor,
    inputs: torch.Tensor,
    steps: list[torch.Tensor | None],
    remerge: Callable[[torch.Tensor], torch.Tensor],
    grid: Grid,
    ambiguous: torch.Tensor,
    samples: int,
    generator: torch.Generator,
) -> Rounded:
    """Round `merged` onto `grid`, resolving the `ambiguous` elements by noise sampling.

    `inputs` [T, *shape] are the merged inputs in the same space as `merged`, `steps` their
    per-element quantization steps (None: stored exact, no noise), and `remerge` the merge
    applied to perturbed inputs.
    """
    codes = grid.nearest(merged)
    nearest = CosineSums.of(grid.value(codes), merged, inputs)
    result = Rounded(codes, 0, int(ambiguous.sum()), nearest, nearest)
    if samples <= 0 or result.ambiguous == 0 or torch.isnan(nearest.cosines()).any():
        return result
    position = grid.position(merged)
    low = torch.floor(position).clamp_(0, grid.levels)
    high = (low + 1).clamp_(max=grid.levels)
    best_cos = nearest.cosines()
    for k in range(1, samples + 1):
        noisy = inputs.clone()
        for t, step in enumerate(steps):
            if step is not None:
                noise = (torch.rand(step.shape, generator=generator) - 0.5) * step
                noisy[t] += noise * ambiguous
        drawn = torch.round(grid.position(remerge(noisy)))
        candidate = torch.where(ambiguous, torch.minimum(torch.maximum(drawn, low), high), codes)
        sums = CosineSums.of(grid.value(candidate), merged, inputs)
        cos = sums.cosines()
        if bool((cos > best_cos).all()):
            result.codes, result.chosen, result.best, best_cos = candidate, k, sums, cos
    return result


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
                "ambiguous": rounded.ambiguous,
                "chosen": rounded.chosen,
                "cosine_nearest": _floats(rounded.nearest.cosines()),
                "cosine_chosen": _floats(rounded.best.cosines()),
            }
        )

    def report(self) -> dict:
        rows = self.rows
        return {
            "tensors": len(rows),
            "tensors_changed": sum(1 for r in rows if r["chosen"] != 0),
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
