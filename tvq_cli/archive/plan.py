"""How a model's tensors map onto archive entries: quantized, exact or shared."""

from __future__ import annotations

import fnmatch

from ..io.checkpoint import TensorSpec
from .format import Part, TensorEntry


def plan_tensors(
    specs: dict[str, TensorSpec], parts: list[Part], keep: tuple[str, ...] = ()
) -> list[TensorEntry]:
    """How each tensor is stored: non-float shared, 1-D or `keep` exact, the rest quantized."""
    entries = []
    for name, spec in specs.items():
        if not spec.is_float:
            kind = "shared"
        elif len(spec.shape) < 2 or any(fnmatch.fnmatchcase(name, g) for g in keep):
            kind = "exact"
        else:
            kind = "quantized"
        entries.append(
            TensorEntry(name, spec.shape, spec.dtype, kind, parts if kind == "quantized" else [])
        )
    return entries
