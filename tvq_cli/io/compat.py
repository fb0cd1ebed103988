"""Whether fine-tuned checkpoints fit their pretrained one: same tensors, shapes and dtypes."""

from __future__ import annotations

from ..dtypes import INPUT_FLOATS
from ..errors import TvqError
from .checkpoint import Checkpoint


def check_compatible(pretrained: Checkpoint, finetuned: list[Checkpoint]) -> None:
    """Same keys, shapes and dtypes everywhere; float tensors in fp32, fp16 or bf16."""
    for name, spec in pretrained.specs.items():
        if spec.is_float and spec.dtype not in INPUT_FLOATS:
            raise TvqError(
                f"{pretrained.path}: tensor {name} has dtype {spec.dtype}; "
                "float tensors must be F32, F16 or BF16"
            )
    for ckpt in finetuned:
        for name, spec in pretrained.specs.items():
            other = ckpt.specs.get(name)
            if other is None:
                raise TvqError(f"{ckpt.path}: tensor {name} is missing (present in pretrained)")
            if other.shape != spec.shape:
                raise TvqError(
                    f"{ckpt.path}: tensor {name} has shape {list(other.shape)}, "
                    f"pretrained has {list(spec.shape)}"
                )
            if other.dtype != spec.dtype:
                raise TvqError(
                    f"{ckpt.path}: tensor {name} has dtype {other.dtype}, "
                    f"pretrained has {spec.dtype}"
                )
        extra = [n for n in ckpt.specs if n not in pretrained.specs]
        if extra:
            raise TvqError(f"{ckpt.path}: tensor {extra[0]} is not in the pretrained checkpoint")
