"""Consensus merging (Wang et al., 2024): keep elements that at least k TALL masks share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import TvqError
from ..base import MergeMethod, Option, register
from .tall import MASK_LAMBDA, tall_masks

if TYPE_CHECKING:
    import torch


@register
class Consensus(MergeMethod):
    name = "consensus"
    summary = "Task arithmetic restricted to elements where >= k TALL masks agree."
    formula = "c = [sum_t m_t >= k]; theta = theta_pre + lambda * c * sum_t tau_t"
    paper = "Wang et al., Localizing Task Information for Improved Model Merging, ICML 2024"
    options = (
        Option("lambda", 0.3, "Scaling coefficient (task arithmetic's default)."),
        Option("k", 2, "Minimum number of TALL masks that must agree.", kind=int, low=1),
        MASK_LAMBDA,
    )

    def validate(self) -> None:
        if self.values["k"] > self.ctx.n_tasks:
            raise TvqError(
                f"consensus: --k {self.values['k']} is more than the {self.ctx.n_tasks} tasks"
            )

    def merge(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        votes = tall_masks(taus, self.values["mask_lambda"]).sum(0)
        return self.values["lambda"] * (votes >= self.values["k"]) * taus.sum(0)
