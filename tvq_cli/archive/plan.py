"""How a model's tensors map onto archive entries: quantized, exact or shared."""

from __future__ import annotations

import fnmatch

from ..io.checkpoint import TensorSpec
from .format import Part, TensorEntry


def plan_tensors(
    specs: dict[str, TensorSpec],
    parts: list[Part],
    keep: tuple[str, ...] = (),
    vectors: list[Part] | None = None,
) -> list[TensorEntry]:
    """How each tensor is stored: non-float shared, `keep` exact, 2-D or more quantized with
    `parts`; 1-D quantized with `vectors` when given (low-rate parts, under a budget), else
    exact."""
    entries = []
    for name, spec in specs.items():
        own = parts
        if not spec.is_float:
            kind = "shared"
        elif any(fnmatch.fnmatchcase(name, g) for g in keep) or not spec.shape:
            kind = "exact"
        elif len(spec.shape) < 2:
            kind, own = ("exact", []) if vectors is None else ("quantized", vectors)
        else:
            kind = "quantized"
        entries.append(
            TensorEntry(name, spec.shape, spec.dtype, kind, own if kind == "quantized" else [])
        )
    return entries
