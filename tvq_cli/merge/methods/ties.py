"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

Trimming keeps each task's top-k% magnitudes. With the default global scope the cut-off is the
exact k-th value over the whole flattened model, as in the paper's code, found in two streaming
passes (`topk.StreamingKth`); a third pass counts the elected signs, whose majority decides the
elements where the election is a tie (sum exactly zero), again as the paper's code does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...concurrency import StateLock
from ...errors import TvqError
from ...quant import native
from ..base import MergeMethod, Option, broadcast, register

if TYPE_CHECKING:
    import torch

LAMBDA = Option("lambda", 0.3, "Scaling coefficient of the merged task vector.")
TOPK = Option(
    "topk", 20.0, "Percent of each task's largest magnitudes kept.", low=0, high=100, low_open=True
)
SCOPE = Option(
    "topk_scope",
    "global",
    "Where the top-k% cut-off is computed: over the whole model, or per tensor.",
    kind=str,
    choices=("global", "tensor"),
)


def kth_rank(n: int, topk: float) -> int:
    """The rank (1-based, ascending) of the cut-off: kthvalue(|x|, n - int(topk/100 * n))."""
    return n - int(topk / 100.0 * n)


@register
class Ties(MergeMethod):
    name = "ties"
    summary = "Trim to the top-k% per task, elect signs, disjoint mean of agreeing values."
    formula = (
        "trim_t = tau_t * (|tau_t| >= kth_t); s = sign(sum_t w_t trim_t); "
        "theta = theta_pre + lambda * sum_t w_t trim_t [sign(trim_t) = s] / "
        "sum_t w_t [sign(trim_t) = s, trim_t != 0]"
    )
    paper = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023"
    options = (LAMBDA, TOPK, SCOPE)
    takes_weights = True

    def validate(self) -> None:
        from ..topk import StreamingKth

        if bool((self.ctx.weights <= 0).any()):
            raise TvqError(f"{self.name}: --weights must be positive (they weight a disjoint mean)")
        self._kth = [StreamingKth() for _ in self.ctx.tasks]
        self._thresholds: torch.Tensor | None = None
        self._sign_total = 0.0
        self._sign_lock = StateLock()
        self._majority: float | None = None

    @property
    def is_global(self) -> bool:
        return self.values["topk_scope"] == "global"

    @property
    def stat_passes(self) -> int:
        return 3 if self.is_global else 0

    @property
    def elementwise(self) -> bool:
        """Global scope only: a per-tensor cut-off needs the whole tensor."""
        return self.is_global

    def observe(self, pass_index: int, name: str, taus: torch.Tensor) -> None:
        import torch

        from ...quant.kernel import coded_signs

        if pass_index == 0:
            for kth, tau in zip(self._kth, taus, strict=True):
                kth.observe_high(tau)
        elif pass_index == 1:
            for kth, tau in zip(self._kth, taus, strict=True):
                if kth.count and kth_rank(kth.count, self.values["topk"]) >= 1:
                    kth.observe_low(tau)
        else:
            coded = None if isinstance(taus, torch.Tensor) else taus.coded
            if coded is not None and native.lib is not None:  # straight from the codes
                s = taus.s
                weights = self.ctx.weights
                signs = coded_signs(coded, s.start, s.stop - s.start, weights, self._thresholds)
            else:
                values = taus if isinstance(taus, torch.Tensor) else taus.values
                signs = self._signs(values)  # a whole number: exact in any order
            with self._sign_lock:
                self._sign_total += signs

    def end_pass(self, pass_index: int) -> None:
        import torch

        if pass_index == 0:
            for kth in self._kth:
                k = kth_rank(kth.count, self.values["topk"])
                if k >= 1:
                    kth.select(k)
        elif pass_index == 1:
            values = [
                kth.value() if kth_rank(kth.count, self.values["topk"]) >= 1 else 0.0
                for kth in self._kth
            ]
            self._thresholds = torch.tensor(values, dtype=torch.float32)
        else:
            self._majority = float(torch.sign(torch.tensor(self._sign_total)))

    def tensor_thresholds(self, taus: torch.Tensor) -> torch.Tensor:
        """Per-task cut-offs computed on this tensor alone."""
        import torch

        flat = taus.reshape(taus.shape[0], -1).abs()
        k = kth_rank(flat.shape[1], self.values["topk"])
        if k < 1:
            return torch.zeros(taus.shape[0])
        return flat.kthvalue(k, dim=1).values

    @staticmethod
    def _trim(taus: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        import torch

        # where(), not a product with the mask: trimmed values are +0 instead of -0, which
        # changes no sum, sign test or output below
        return torch.where(taus.abs() >= broadcast(thresholds, taus), taus, 0.0)

    @property
    def _unit(self) -> bool:
        """Every weight is 1: products with them are skipped (x * 1.0 is x exactly)."""
        return bool((self.ctx.weights == 1).all())

    def _weighted(self, values: torch.Tensor) -> torch.Tensor:
        """w_t * values_t."""
        if self._unit:
            return values
        return broadcast(self.ctx.weights.to(values.dtype), values) * values

    def _elect(self, trimmed: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.sign(task_sum(self._weighted(trimmed)))

    def _native(self, taus: torch.Tensor) -> bool:
        """Whether the native kernel takes these task vectors (contiguous fp32 on the CPU)."""
        import torch

        return native.lib is not None and taus.dtype == torch.float32 and taus.is_contiguous()

    def _signs(self, taus: torch.Tensor) -> float:
        """The sum of the elected signs of a block (global top-k thresholds)."""
        import numpy as np
        import torch

        if self._native(taus):
            return float(
                native.lib.ties(
                    taus.numpy(), taus.shape[0], self._thresholds.numpy(),
                    self.ctx.weights.to(torch.float32).numpy(), self._unit, 0.0, 1.0,
                    np.empty(0, np.float32),
                )
            )  # fmt: skip
        return float(self._elect(self._trim(taus, self._thresholds)).sum())

    @property
    def merges_codes(self) -> bool:
        return self.is_global and native.lib is not None

    def merge_codes(self, name, coded, first, base, out) -> bool:
        from ...quant.kernel import coded_merge_into

        ties = (self._thresholds, self._unit, self._majority)
        return coded_merge_into(
            coded, first, base, out, self.ctx.weights, self.values["lambda"], ties
        )

    def merge(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        """The reference arithmetic; the native kernel (global top-k) does the same ops, with
        the same task-order sums, element by element."""
        import torch

        if self.is_global:
            thresholds, majority = self._thresholds, self._majority
            if self._native(taus):
                out = torch.empty(taus.shape[1:])
                native.lib.ties(
                    taus.numpy(), taus.shape[0], thresholds.numpy(),
                    self.ctx.weights.to(torch.float32).numpy(), self._unit, majority,
                    self.values["lambda"], out.numpy(),
                )  # fmt: skip
                return out
            trimmed = self._trim(taus, thresholds)
            elected = self._elect(trimmed)
        else:
            trimmed = self._trim(taus, self.tensor_thresholds(taus))
            elected = self._elect(trimmed)
            majority = float(torch.sign(elected.sum()))
        elected = torch.where(elected == 0, majority, elected)
        agree = (torch.sign(trimmed) == elected).logical_and_(trimmed != 0)
        numerator = task_sum(self._weighted(torch.where(agree, trimmed, 0.0)))
        denominator = task_sum(self._weighted(agree.to(torch.float32)))
        merged = torch.where(
            denominator != 0, numerator / denominator.clamp_min(1e-30), torch.zeros(())
        )
        return self.values["lambda"] * merged


def task_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over tasks (dim 0) in task order: torch's own reduction order changes with the
    number of tasks and the tensor's size; this one is the native kernel's."""
    total = values[0].clone()
    for value in values[1:]:
        total += value
    return total
