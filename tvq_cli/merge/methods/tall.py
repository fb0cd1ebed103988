"""TALL masks (Wang et al., 2024): per task, the elements where that task dominates."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import MergeMethod, Option, register

if TYPE_CHECKING:
    import torch

MASK_LAMBDA = Option(
    "mask_lambda", 0.6, "lambda_t of the mask |tau_t| > lambda_t |sum_s tau_s - tau_t|.", low=0
)


def tall_masks(taus: torch.Tensor, mask_lambda: float) -> torch.Tensor:
    """m_t = |tau_t| > lambda |sum_s tau_s - tau_t|, stacked [T, *shape] (bool)."""
    total = taus.sum(0)
    return taus.abs() > mask_lambda * (total.unsqueeze(0) - taus).abs()


@register
class Tall(MergeMethod):
    name = "tall"
    summary = "One model per task: the multi-task vector restricted to the task's TALL mask."
    formula = (
        "m_t = |tau_t| > lambda_t |sum_s tau_s - tau_t|; theta_t = theta_pre + m_t * sum_s tau_s"
    )
    paper = "Wang et al., Localizing Task Information for Improved Model Merging, ICML 2024"
    options = (MASK_LAMBDA,)
    per_task = True

    def merge(self, name: str, taus: torch.Tensor) -> list[torch.Tensor]:
        masks = tall_masks(taus, self.values["mask_lambda"])
        total = taus.sum(0)
        return [masks[t] * total for t in self.ctx.targets]
