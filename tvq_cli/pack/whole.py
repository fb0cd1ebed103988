"""Pack's general route: a whole tensor at a time, each role through its part's coder.

Used for low-rate parts (a record needs the whole tensor's statistics: its histogram, offsets
and gain), where blocks of rows cannot give the same bytes as the whole tensor (a searched
range per tensor, groups that do not divide the rows), and on a GPU (`--device cuda`);
`blocked.py` is the fast route for dense parts. Also what `--dry-run` uses to measure
entropy-coded sizes.
"""

from __future__ import annotations

import torch

from ..archive.format import Part, TensorEntry
from ..archive.schemes import Inputs, Scheme
from ..quant import dzans
from ..quant.quantizer import dequantize, quantize
from ..quant.spec import Quantized

Coded = Quantized | dzans.Encoded  # a dense part's codes, or a low-rate part's record


def encode_whole(
    entry: TensorEntry, scheme: Scheme, inputs: Inputs, error_correction: bool
) -> list[tuple[Part, Coded]]:
    """Every quantized part of one tensor, in storage order (dense codes on the inputs'
    device)."""
    coded: list[tuple[Part, Coded]] = []

    def code(index: int, values: torch.Tensor, reconstruct: bool = False):
        part = entry.parts[index]
        if not part.dense:
            flat = values.detach().cpu().reshape(-1).numpy()
            record = dzans.encode(flat, entry.rows, part.setting, want_values=reconstruct)
            coded.append((part, record))
            if not reconstruct:
                return None
            return torch.from_numpy(record.values).to(values.device).reshape(values.shape)
        q = quantize(values, part.spec)
        coded.append((part, q))
        return dequantize(q, part.spec, entry.shape) if reconstruct else None

    scheme.encode(inputs, code, error_correction)
    return coded
