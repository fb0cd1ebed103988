"""Reading checkpoints: a .safetensors file, a folder with model.safetensors, or a sharded folder.

Tensors are read one at a time, so a checkpoint is never loaded whole. The safetensors library
checks each file's header; the bytes of a tensor are then read with `pread` into a fresh
buffer rather than through a memory map: mapped pages that have been touched count towards the
process's resident memory until the map is closed (a 1B-parameter model would add its whole
size), a file truncated under a map kills the process with SIGBUS where a short read is a clean
error, and a plain read releases the GIL, so a background thread can read the next tensor while
the current one is processed. Only safetensors is read (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
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
        return math.prod(self.shape)

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
        self._files: dict[Path, object] = {}
        self._where: dict[str, tuple[Path, int, int]] = {}
        self.specs: dict[str, TensorSpec] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises several types for bad files
                raise TvqError(f"{file}: not a readable safetensors file ({exc})") from None
            self.metadata.update(handle.metadata() or {})
            places = _data_places(file)
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                if mapping is not None and mapping.get(name) != file:
                    continue
                tensor_slice = handle.get_slice(name)
                self.specs[name] = TensorSpec(
                    tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                )
                self._where[name] = (file, *places[name])
            del handle  # its memory map is not needed: tensors are read with pread
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
        """Read one tensor in its stored dtype into memory of its own (no map, no copy after)."""
        try:
            file, start, nbytes = self._where[name]
        except KeyError:
            raise TvqError(f"{self.path}: no tensor named {name}") from None
        spec = self.specs[name]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        try:
            handle = self._open(file)
            done = 0
            while done < nbytes:
                got = os.preadv(handle.fileno(), [view[done:]], start + done)
                if got == 0:
                    raise TvqError(
                        f"{file}: ended while reading tensor {name} "
                        "(the file was truncated or replaced while being read)"
                    )
                done += got
        except OSError as exc:
            raise TvqError(f"{file}: cannot read tensor {name} ({exc.strerror})") from None
        return buffer.view(ST_TO_TORCH[spec.dtype]).reshape(spec.shape)

    def _open(self, file: Path):
        handle = self._files.get(file)
        if handle is None:
            try:
                handle = self._files[file] = open(file, "rb", buffering=0)  # noqa: SIM115
            except FileNotFoundError:
                raise TvqError(f"{file}: vanished while being read") from None
        return handle

    def close(self) -> None:
        """Close the open files (they are also closed when the object is collected)."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def load_float(self, name: str) -> torch.Tensor:
        """Read one float tensor as float32, refusing NaN and Inf."""
        tensor = self.load(name).to(torch.float32)
        if not all_finite(tensor):
            raise TvqError(f"{self.path}: tensor {name} contains NaN or Inf")
        return tensor

    def fingerprint(self) -> str:
        """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
        return combine_digests({name: tensor_digest(name, self.load(name)) for name in self.specs})


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf.

    A finite sum proves it (NaN and Inf propagate through a sum) at the cost of one fast
    reduction; only when the sum overflows is the elementwise test (several times slower,
    and it allocates a mask) needed to decide.
    """
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _data_places(file: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte offset and size of every tensor in a safetensors file (header checked by
    the safetensors library before this is called)."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        return {
            name: (
                8 + length + int(info["data_offsets"][0]),
                int(info["data_offsets"][1]) - int(info["data_offsets"][0]),
            )
            for name, info in header.items()
        }
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise TvqError(f"{file}: not a readable safetensors file ({exc})") from None


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
