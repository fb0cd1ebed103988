"""Model Breadcrumbs (Davari & Belilovsky, 2024): drop outliers and the small tail, per row.

Per row (last dimension; a 1-D tensor is one row) the elements are ranked by |tau|: the top
gamma fraction (outliers) is dropped, the next beta fraction is kept, the rest is dropped.
Counts are floor(gamma * n) and floor(beta * n) as in mergekit; ties in |tau| are ranked by
position (stable sort).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import TvqError
from ..base import MergeMethod, Option, register

if TYPE_CHECKING:
    import torch


def breadcrumbs_mask(tau: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """Bool mask of the kept elements of one task vector."""
    import torch

    if tau.dim() == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    n = tau.shape[-1]
    rows = tau.reshape(-1, n).abs()
    order = torch.argsort(rows, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand_as(order))
    top, keep = int(gamma * n), int(beta * n)
    return ((rank >= top) & (rank < top + keep)).reshape(tau.shape)


@register
class Breadcrumbs(MergeMethod):
    name = "breadcrumbs"
    summary = "Per row drop the top gamma and keep the next beta of |tau|; sum; scale."
    formula = "theta = theta_pre + lambda * sum_t w_t (mask_t * tau_t)   (mask: per-row ranks)"
    paper = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging, ECCV 2024"
    options = (
        Option("lambda", 0.3, "Scaling coefficient (alpha in the paper)."),
        Option("beta", 0.15, "Fraction of each row kept (after the outliers).", low=0, high=1),
        Option("gamma", 0.006, "Fraction of each row's largest |tau| dropped.", low=0, high=1),
    )
    takes_weights = True

    def validate(self) -> None:
        if self.values["beta"] + self.values["gamma"] > 1:
            raise TvqError("breadcrumbs: --beta plus --gamma must be at most 1")

    def merge(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        import torch

        gamma, beta = self.values["gamma"], self.values["beta"]
        kept = torch.stack([tau * breadcrumbs_mask(tau, gamma, beta) for tau in taus])
        return self.values["lambda"] * self.weighted_sum(kept)
