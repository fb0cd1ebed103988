"""MagMax (Marczak et al., 2024): per element, the task value of largest magnitude."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import MergeMethod, Option, register

if TYPE_CHECKING:
    import torch


@register
class MagMax(MergeMethod):
    name = "magmax"
    summary = "Per element keep the task value with the largest |tau| (later task wins ties)."
    formula = "theta = theta_pre + lambda * tau_{t*}, t* = last argmax_t |tau_t|  (per element)"
    paper = "Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual Learning, 2024"
    options = (Option("lambda", 0.5, "Scaling coefficient of the selected values."),)
    elementwise = True

    def merge(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        last = taus.shape[0] - 1
        # argmax returns the first maximum; on the reversed stack that is the last task's.
        index = last - taus.flip(0).abs().argmax(dim=0, keepdim=True)
        return self.values["lambda"] * taus.gather(0, index).squeeze(0)
