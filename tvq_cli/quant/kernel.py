"""Block-sized, allocation-free steps of the pack and merge pipelines, in caller-owned buffers.

Why buffers: on the target machine a fresh multi-megabyte tensor costs a page fault per 4 KiB,
so allocation, not arithmetic, was the main cost of whole-tensor ops on big tensors. Widening
takes one native pass where the native kernels are built; dequantization is the same math, op
for op, as `quantizer.dequantize`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..tensors import all_finite
from . import native
from .spec import QuantSpec

NATIVE_WIDEN = {torch.bfloat16: torch.int16, torch.float32: torch.float32}  # dtype: numpy view
_EMPTY = np.empty(0, np.float32)


def widen_into(raw: torch.Tensor, out: torch.Tensor, minus: torch.Tensor | None = None) -> bool:
    """``out = float32(raw) - minus`` (`minus` optional) for contiguous blocks of equal size;
    returns whether every value of `out` is finite. bf16 and fp32 inputs take one native pass
    (widen, subtract and check together); other dtypes, or no native build, take torch's."""
    lib = native.lib
    if lib is not None and raw.dtype in NATIVE_WIDEN and raw.is_contiguous():
        src = raw.reshape(-1).view(NATIVE_WIDEN[raw.dtype]).numpy()
        rest = _EMPTY if minus is None else minus.reshape(-1).numpy()
        return lib.widen(src, raw.dtype == torch.bfloat16, rest, out.reshape(-1).numpy())
    view = out.view(raw.shape)
    view.copy_(raw)  # widen, then subtract: a mixed-dtype sub is not vectorized
    if minus is not None:
        view.sub_(minus.view(raw.shape))
    return all_finite(out)


def dequantize_into(
    codes: torch.Tensor,
    spec: QuantSpec,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """`dequantize` of whole groups (or of one per-tensor group) into float32 `out` (same
    element count as `codes`)."""
    out.copy_(codes)
    values = out.view(-1, spec.group_size) if spec.group_size else out.view(1, -1)
    values.sub_(zeros.to(torch.float32)[:, None]).div_(scales[:, None])
