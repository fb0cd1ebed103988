"""EMR-Merging (Huang et al., 2024): elect, mask, rescale; one model per task.

The rescalers are whole-model statistics, computed in one streaming pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import MergeMethod, register

if TYPE_CHECKING:
    import torch


def elect(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flag = sign(sum_t tau_t) (0 counts as -1); tau_uni = flag * max |tau_t| over agreeing t."""
    import torch

    flag = torch.where(taus.sum(0) > 0, 1.0, -1.0)
    agreeing = (taus * flag) > 0
    tau_uni = flag * (taus.abs() * agreeing).amax(0)
    return flag, tau_uni


@register
class Emr(MergeMethod):
    name = "emr"
    summary = "Elect a unified vector; per task a sign mask and a rescaler (one model per task)."
    formula = (
        "flag = sign(sum_t tau_t); tau_uni = flag * max_t |tau_t| [tau_t flag > 0]; "
        "M_t = [tau_t flag > 0]; r_t = sum|tau_t| / sum|M_t tau_uni|; "
        "theta_t = theta_pre + r_t M_t tau_uni"
    )
    paper = "Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024"
    per_task = True

    def validate(self) -> None:
        import torch

        self._own = torch.zeros(self.ctx.n_tasks, dtype=torch.float64)
        self._masked = torch.zeros(self.ctx.n_tasks, dtype=torch.float64)
        self.rescalers = torch.ones(self.ctx.n_tasks, dtype=torch.float64)

    @property
    def stat_passes(self) -> int:
        return 1

    def observe(self, pass_index: int, name: str, taus: torch.Tensor) -> None:
        flag, tau_uni = elect(taus)
        masks = (taus * flag) > 0
        flat = taus.reshape(taus.shape[0], -1).double()
        self._own += flat.abs().sum(1)
        self._masked += (masks * tau_uni).reshape(taus.shape[0], -1).double().abs().sum(1)

    def end_pass(self, pass_index: int) -> None:
        import torch

        self.rescalers = torch.where(
            self._masked > 0, self._own / self._masked.clamp_min(1e-300), torch.ones(())
        )

    def coefficients(self) -> dict:
        return {"rescalers": dict(zip(self.ctx.tasks, self.rescalers.tolist(), strict=True))}

    def merge(self, name: str, taus: torch.Tensor) -> list[torch.Tensor]:
        flag, tau_uni = elect(taus)
        masks = (taus * flag) > 0
        return [float(self.rescalers[t]) * masks[t] * tau_uni for t in self.ctx.targets]
