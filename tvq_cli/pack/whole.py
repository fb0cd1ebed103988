"""Pack's general route: a whole tensor at a time through `quantize`.

Used where blocks of rows cannot give the same bytes (a searched range per tensor, groups that
do not divide the rows) and on a GPU (`--device cuda`); `blocked.py` is the fast route for
everything else. Also what `--dry-run` uses to measure entropy-coded sizes.
"""

from __future__ import annotations

import torch

from ..archive.format import Part, TensorEntry
from ..archive.schemes import Inputs, Scheme
from ..quant.quantizer import dequantize, quantize
from ..quant.spec import Quantized


def encode_whole(
    entry: TensorEntry, scheme: Scheme, inputs: Inputs, error_correction: bool
) -> list[tuple[Part, Quantized]]:
    """Every quantized part of one tensor, in storage order (codes on the inputs' device)."""
    coded: list[tuple[Part, Quantized]] = []

    def code(index: int, values: torch.Tensor, reconstruct: bool = False):
        part = entry.parts[index]
        q = quantize(values, part.spec)
        coded.append((part, q))
        return dequantize(q, part.spec, entry.shape) if reconstruct else None

    scheme.encode(inputs, code, error_correction)
    return coded
