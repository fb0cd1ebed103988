"""The one table of tensor dtypes: safetensors names, sizes, numpy and torch types.

safetensors names ("F32", "BF16", "I64", ...) are the currency everywhere (headers, specs,
archive entries); torch and numpy types are looked up here. numpy has no bfloat16, so BF16
bytes are viewed as uint16 there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DType:
    name: str  # safetensors dtype string
    itemsize: int
    torch: torch.dtype
    numpy: type  # the numpy view of the raw bytes (uint16 for BF16)
    is_float: bool


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", 8, torch.float64, np.float64, True),
        DType("F32", 4, torch.float32, np.float32, True),
        DType("F16", 2, torch.float16, np.float16, True),
        DType("BF16", 2, torch.bfloat16, np.uint16, True),
        DType("I64", 8, torch.int64, np.int64, False),
        DType("I32", 4, torch.int32, np.int32, False),
        DType("I16", 2, torch.int16, np.int16, False),
        DType("I8", 1, torch.int8, np.int8, False),
        DType("U8", 1, torch.uint8, np.uint8, False),
        DType("BOOL", 1, torch.bool, np.bool_, False),
    )
}
INPUT_FLOATS = ("F32", "F16", "BF16")  # float dtypes a checkpoint may hold to be packed
OUTPUT_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}  # `--dtype` names
_BY_TORCH = {d.torch: d.name for d in DTYPES.values()}


def itemsize(name: str) -> int:
    return DTYPES[name].itemsize


def to_torch(name: str) -> torch.dtype:
    return DTYPES[name].torch


def config_name(name: str) -> str:
    """How a Hugging Face config.json spells a dtype ("F32" -> "float32", "BF16" -> "bfloat16")."""
    return str(to_torch(name)).removeprefix("torch.")


def from_torch(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (its repr for types safetensors lacks)."""
    return _BY_TORCH.get(dtype, str(dtype))
