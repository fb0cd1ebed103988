"""RTVQ: a shared base (the mean task vector) plus one offset per task (Residual TVQ).

With error correction the offsets are taken against the base's reconstruction, so the base's
quantization error is absorbed by the offsets: `tau_t = deQ(base) + deQ(offset_t)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .base import Scheme, get, register

if TYPE_CHECKING:
    import torch


def task_mean(inputs: Iterable[torch.Tensor], count: int, out: torch.Tensor | None = None):
    """RTVQ's base: the sum of the task vectors in task order, divided by their count.

    An explicit order (rather than `torch.stack(...).mean(0)`, whose summation order depends on
    the tensor's size) makes the result the same for a whole tensor and for any block of it,
    and needs no stacked copy of all task vectors: they may come one at a time.
    """
    base = None
    for tau in inputs:
        base = (tau.clone() if out is None else out.copy_(tau)) if base is None else base.add_(tau)
    return base.div_(count)


@register
class ResidualTaskVectors(Scheme):
    name = "rtvq"
    task_prefix = "offset"
    shared_roles = ("base",)
    corrects_error = True

    def role_bits(self, tasks, settings) -> list[int]:
        return [settings.base_bits] + [settings.offset_bits] * len(tasks)

    def encode(self, inputs, code, error_correction, scratch=None) -> None:
        base = task_mean(inputs, len(inputs), out=scratch)
        reconstructed = code(0, base, error_correction)
        anchor = reconstructed if error_correction else base
        for index, tau in enumerate(inputs, start=1):
            code(index, tau.sub_(anchor))

    def anchor(self, dequantized):
        return dequantized("base")

    @property
    def added_tasks(self):
        return get("tvq")  # an offset is a task vector less the base: coded as TVQ codes it

    def decode(self, task, dequantized, pretrained):
        return dequantized("base").add_(dequantized(self.task_role(task)))
