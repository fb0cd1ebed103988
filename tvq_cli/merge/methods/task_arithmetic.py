"""Task arithmetic (Ilharco et al., 2023, "Editing models with task arithmetic")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...quant import native
from ..base import MergeMethod, Option, register

if TYPE_CHECKING:
    import torch

LAMBDA = Option("lambda", 0.3, "Scaling coefficient of the summed task vectors.")


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "Add the (weighted) sum of task vectors, scaled by lambda."
    formula = "theta = theta_pre + lambda * sum_t w_t tau_t"
    paper = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023"
    options = (LAMBDA,)
    takes_weights = True
    elementwise = True

    @property
    def merges_codes(self) -> bool:
        return native.lib is not None

    def merge(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        return self.weighted_sum(taus, self.values["lambda"])

    def merge_codes(self, name, coded, first, base, out) -> bool:
        from ...quant.kernel import coded_merge_into

        return coded_merge_into(coded, first, base, out, self.ctx.weights, self.values["lambda"])
