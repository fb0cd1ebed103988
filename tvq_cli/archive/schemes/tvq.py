"""TVQ: each task vector quantized on its own (the paper's Task Vector Quantization)."""

from __future__ import annotations

from .base import Scheme, register


@register
class TaskVectors(Scheme):
    name = "tvq"
    task_prefix = "task"
    within_task_vector = True
    direct = True

    def sole_role(self, task: str) -> str | None:
        return self.task_role(task)

    def decode(self, task, dequantized, pretrained):
        return dequantized(self.task_role(task))
