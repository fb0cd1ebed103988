"""FQ: the fine-tuned weights themselves quantized (the baseline TVQ is compared to)."""

from __future__ import annotations

from ...errors import TvqError
from .base import Scheme, register


@register
class FineTunedWeights(Scheme):
    name = "fq"
    task_prefix = "ft"
    subtracts_pretrained = False
    direct = True

    def decode(self, task, dequantized, pretrained):
        import torch

        if pretrained is None:
            raise TvqError("an FQ archive needs the pretrained weights to form task vectors")
        return dequantized(self.task_role(task)).sub_(pretrained.to(torch.float32))
