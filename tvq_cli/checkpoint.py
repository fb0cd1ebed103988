"""Reading checkpoints: a .safetensors file, a folder with model.safetensors, or a sharded folder.

Tensors are read one at a time through memory-mapped safetensors handles, so a checkpoint is
never loaded whole. Only safetensors is read (never pickle).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import TvqError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TORCH_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "F32", "BF16", "I64"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES or self.dtype.startswith("F")

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=ST_TO_TORCH[self.dtype]).element_size()


def resolve_weight_files(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The safetensors files behind `path`, and the tensor->file map when sharded."""
    if not path.exists():
        raise TvqError(f"{path}: no such file or folder")
    if path.is_file():
        return [path], None
    index = path / INDEX_FILE
    single = path / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise TvqError(f"{index}: not a valid safetensors index ({exc})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise TvqError(f"{index}: its weight_map is empty or malformed")
        for shard in set(weight_map.values()):
            if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise TvqError(f"{index}: names a shard outside its folder: {shard!r}")
        mapping = {name: path / shard for name, shard in weight_map.items()}
        files = sorted(set(mapping.values()))
        for shard in files:
            if not shard.is_file():
                raise TvqError(f"{index}: shard {shard.name} is missing")
        return files, mapping
    if single.is_file():
        return [single], None
    raise TvqError(f"{path}: folder has neither {SINGLE_FILE} nor {INDEX_FILE}")


class Checkpoint:
    """One model's tensors, read lazily tensor by tensor."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        files, mapping = resolve_weight_files(self.path)
        self.files = files
        self.is_sharded = mapping is not None
        self._handles = {}
        self._where: dict[str, Path] = {}
        self.specs: dict[str, TensorSpec] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises several types for bad files
                raise TvqError(f"{file}: not a readable safetensors file ({exc})") from None
            self._handles[file] = handle
            self.metadata.update(handle.metadata() or {})
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                if mapping is not None and mapping.get(name) != file:
                    continue
                tensor_slice = handle.get_slice(name)
                self.specs[name] = TensorSpec(
                    tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                )
                self._where[name] = file
        if mapping is not None:
            missing = sorted(set(mapping) - set(self.specs))
            if missing:
                raise TvqError(f"{self.path}: tensor {missing[0]} listed in the index is missing")
        if not self.specs:
            raise TvqError(f"{self.path}: checkpoint holds no tensors")

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor in its stored dtype."""
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except KeyError:
            raise TvqError(f"{self.path}: no tensor named {name}") from None
        except Exception as exc:
            raise TvqError(f"{self.path}: cannot read tensor {name} ({exc})") from None

    def load_float(self, name: str) -> torch.Tensor:
        """Read one float tensor as float32, refusing NaN and Inf."""
        tensor = self.load(name).to(torch.float32)
        if not torch.isfinite(tensor).all():
            raise TvqError(f"{self.path}: tensor {name} contains NaN or Inf")
        return tensor

    def fingerprint(self) -> str:
        """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
        return combine_digests({name: tensor_digest(name, self.load(name)) for name in self.specs})


def combine_digests(digests: dict[str, bytes]) -> str:
    """Fold per-tensor digests (any processing order) into one checkpoint fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(digests[name])
    return "sha256:" + digest.hexdigest()


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """One tensor's contribution to a checkpoint fingerprint."""
    spec = f"{name}\0{TORCH_TO_ST.get(tensor.dtype, str(tensor.dtype))}\0{list(tensor.shape)}\0"
    digest = hashlib.sha256(spec.encode())
    digest.update(tensor_bytes(tensor))
    return digest.digest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without copying when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())
