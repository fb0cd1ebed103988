"""The one table of tensor dtypes: safetensors names, sizes, numpy and torch types.

safetensors names ("F32", "BF16", "I64", ...) are the currency everywhere (headers, specs,
archive entries); torch and numpy types are looked up here. numpy has no bfloat16, so BF16
bytes are viewed as uint16 there. The table names the types rather than holding them, so that
reading a header (`tvq inspect`) imports neither torch nor numpy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str  # safetensors dtype string
    itemsize: int
    torch_name: str  # the attribute of `torch` ("float32")
    numpy_name: str  # the numpy view of the raw bytes ("uint16" for BF16)
    is_float: bool

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_name)

    @property
    def numpy(self) -> type:
        import numpy

        return getattr(numpy, self.numpy_name)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", 8, "float64", "float64", True),
        DType("F32", 4, "float32", "float32", True),
        DType("F16", 2, "float16", "float16", True),
        DType("BF16", 2, "bfloat16", "uint16", True),
        DType("I64", 8, "int64", "int64", False),
        DType("I32", 4, "int32", "int32", False),
        DType("I16", 2, "int16", "int16", False),
        DType("I8", 1, "int8", "int8", False),
        DType("U8", 1, "uint8", "uint8", False),
        DType("BOOL", 1, "bool", "bool_", False),
    )
}
INPUT_FLOATS = ("F32", "F16", "BF16")  # float dtypes a checkpoint may hold to be packed
OUTPUT_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}  # `--dtype` names


def itemsize(name: str) -> int:
    return DTYPES[name].itemsize


def to_torch(name: str) -> torch.dtype:
    return DTYPES[name].torch


def config_name(name: str) -> str:
    """How a Hugging Face config.json spells a dtype ("F32" -> "float32", "BF16" -> "bfloat16")."""
    return DTYPES[name].torch_name


def from_torch(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (its repr for types safetensors lacks)."""
    return _by_torch().get(dtype, str(dtype))


@functools.cache
def _by_torch() -> dict[torch.dtype, str]:
    return {d.torch: d.name for d in DTYPES.values()}
