"""DARE (Yu et al., 2024): drop and rescale each task vector, then task arithmetic or TIES.

Each element is dropped with probability p and the rest are scaled by 1/(1-p), so the
expected task vector is unchanged. The random masks are drawn from a generator seeded by
(--seed, tensor name, task name), so a merge is reproducible and the same masks come back in
every pass (TIES' statistics passes, noise-sampled rounding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import TvqError
from ..base import MergeMethod, Option, register
from .task_arithmetic import TaskArithmetic
from .ties import SCOPE, TOPK, Ties

if TYPE_CHECKING:
    import torch


@register
class Dare(MergeMethod):
    name = "dare"
    summary = "Drop elements with probability p, rescale by 1/(1-p), then task arithmetic or TIES."
    formula = (
        "tau'_t = tau_t * [u_t > p] / (1-p), u_t ~ U[0,1) seeded; "
        "then task_arithmetic (lambda 0.3) or ties (lambda 0.5, no trim) on tau'_t"
    )
    paper = "Yu et al., Language Models are Super Mario (DARE), ICML 2024"
    options = (
        Option("p", 0.5, "Drop probability.", low=0, high=1, high_open=True),
        Option(
            "then",
            "task_arithmetic",
            "Merge applied after drop-and-rescale.",
            kind=str,
            choices=("task_arithmetic", "ties"),
        ),
        Option(
            "lambda",
            lambda m: 0.5 if m.values["then"] == "ties" else 0.3,
            "Scaling coefficient.",
            default_text="0.3 (0.5 with --then ties)",
        ),
        Option(
            "topk",
            100.0,
            "With --then ties: percent kept by TIES' trim (DARE already sparsifies).",
            low=TOPK.low,
            high=TOPK.high,
            low_open=True,
        ),
        SCOPE,
    )
    takes_weights = True

    def __init__(self, values: dict, ctx) -> None:
        then = values.get("then", "task_arithmetic")
        for key in ("topk", "topk_scope"):
            if key in values and then != "ties":
                raise TvqError(f"dare: --{key.replace('_', '-')} applies only with --then ties")
        super().__init__(values, ctx)

    def validate(self) -> None:
        lam = self.values["lambda"]
        if self.values["then"] == "ties":
            self.inner: MergeMethod = Ties(
                {
                    "lambda": lam,
                    "topk": self.values["topk"],
                    "topk_scope": self.values["topk_scope"],
                },
                self.ctx,
            )
        else:
            self.inner = TaskArithmetic({"lambda": lam}, self.ctx)

    def coefficients(self) -> dict:
        if self.values["then"] == "ties":
            return dict(self.values)
        return {k: self.values[k] for k in ("p", "then", "lambda")}

    def sparsify(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        import torch

        p = self.values["p"]
        out = torch.empty_like(taus)
        for t, task in enumerate(self.ctx.tasks):
            keep = torch.rand(taus.shape[1:], generator=self.rng(name, task, "dare")) > p
            out[t] = taus[t] * keep / (1.0 - p)
        return out

    @property
    def stat_passes(self) -> int:
        return self.inner.stat_passes

    def observe(self, pass_index: int, name: str, taus: torch.Tensor) -> None:
        self.inner.observe(pass_index, name, self.sparsify(name, taus))

    def end_pass(self, pass_index: int) -> None:
        self.inner.end_pass(pass_index)

    def merge(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        return self.inner.merge(name, self.sparsify(name, taus))
