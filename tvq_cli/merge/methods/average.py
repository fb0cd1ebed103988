"""Weight averaging (model soups; the mid-point merge HDRQ quantizes for)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import TvqError
from ..base import MergeMethod, register

if TYPE_CHECKING:
    import torch


@register
class Average(MergeMethod):
    name = "average"
    summary = "Mean of the task vectors (the mean of the fine-tuned models)."
    formula = "theta = theta_pre + sum_t w_t tau_t / sum_t w_t   (w_t = 1: mean_t tau_t)"
    paper = "Wortsman et al., Model soups, ICML 2022; Li et al. 2024 (mid-point merging)"
    takes_weights = True
    elementwise = True

    def validate(self) -> None:
        if float(self.ctx.weights.sum()) == 0.0:
            raise TvqError("average: --weights must not sum to zero")

    def merge(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        return self.weighted_sum(taus) / self.ctx.weights.sum()
