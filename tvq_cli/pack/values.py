"""One tensor's fp32 scheme inputs, formed from raw (stored-dtype) tensors on demand."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..tensors import require_finite

RawSource = tuple[Path, Callable[[], torch.Tensor]]  # where it comes from, how to get it


def widen(raw: torch.Tensor, device: torch.device, where: Path, name: str) -> torch.Tensor:
    """fp32 on `device`, refusing NaN and Inf."""
    return require_finite(raw.to(device, torch.float32), where, name)


class TaskValues:
    """The task vectors (`pretrained` given) or the fine-tuned weights (`pretrained` None) of
    one tensor, in task order: a fresh fp32 tensor per item, each time the sequence is
    iterated, so a scheme may iterate twice and change items in place."""

    def __init__(
        self,
        name: str,
        sources: list[RawSource],
        pretrained: torch.Tensor | None,
        device: torch.device,
    ):
        self.name, self.sources, self.pretrained, self.device = name, sources, pretrained, device

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for path, load in self.sources:
            raw = load()
            values = widen(raw, self.device, path, self.name)
            if self.pretrained is not None:
                yield values.sub(self.pretrained)  # not in place: `values` may be `raw`
            else:
                yield values.clone() if values is raw else values
