"""LiNeS (Wang et al., 2025): layer-increasing scaling of the merged task vector."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..base import MergeMethod, Option, register

if TYPE_CHECKING:
    import torch

BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|resblocks|blocks|block|h)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The block number in a tensor name (`layers.5.`, `resblocks.5.`, `layer.5.`, `h.5.`)."""
    match = BLOCK.search(name)
    return int(match.group(1)) if match else None


@register
class Lines(MergeMethod):
    name = "lines"
    summary = "Sum of task vectors scaled per block: shallow blocks less, deep blocks more."
    formula = (
        "theta = theta_pre + (alpha + beta * i/(L-1)) * sum_t w_t tau_t  "
        "(i: block index, L: blocks; alpha outside blocks)"
    )
    paper = "Wang et al., LiNeS: Post-training Layer Scaling Prevents Forgetting, ICLR 2025"
    options = (
        Option(
            "alpha",
            lambda m: 1.0 / m.ctx.n_tasks,
            "Coefficient of the first block and of tensors outside blocks.",
            default_text="1/T",
        ),
        Option("beta", 0.5, "Extra coefficient reached at the last block."),
    )
    takes_weights = True
    elementwise = True

    def validate(self) -> None:
        indices = [block_index(n) for n in self.ctx.tensor_names]
        self.blocks = max((i for i in indices if i is not None), default=-1) + 1

    def scale(self, name: str) -> float:
        index = block_index(name)
        alpha, beta = self.values["alpha"], self.values["beta"]
        if index is None:
            return alpha
        return alpha + beta * (index / (self.blocks - 1) if self.blocks > 1 else 0.0)

    def coefficients(self) -> dict:
        return {**self.values, "blocks": self.blocks}

    def merge(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        return self.scale(name) * self.weighted_sum(taus)
