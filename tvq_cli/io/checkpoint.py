"""Reading checkpoints: a .safetensors file, a folder with model.safetensors, or a sharded folder.

Tensors are read one at a time, so a checkpoint is never loaded whole. The safetensors library
checks each file's header; the bytes of a tensor are then read with `pread` into a fresh
buffer rather than through a memory map: mapped pages that have been touched count towards the
process's resident memory until the map is closed (a 1B-parameter model would add its whole
size), a file truncated under a map kills the process with SIGBUS where a short read is a clean
error, and a plain read releases the GIL, so a background thread can read the next tensor while
the current one is processed (`safetensors_file`). Only safetensors is read (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..dtypes import INPUT_FLOATS, from_torch, itemsize, to_torch
from ..errors import TvqError
from ..tensors import require_finite, tensor_bytes
from .safetensors_file import data_places, pread_into, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "F32", "BF16", "I64"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in INPUT_FLOATS or self.dtype.startswith("F")

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


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
        self._files: dict[Path, object] = {}
        self._where: dict[str, tuple[Path, int, int]] = {}
        self.specs: dict[str, TensorSpec] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises several types for bad files
                raise TvqError(f"{file}: not a readable safetensors file ({exc})") from None
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

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor in its stored dtype into memory of its own (no map, no copy after):
        a fresh buffer, or `out` (uint8, at least the tensor's bytes), reused by callers that
        read many tensors, since a fresh buffer costs a page fault per 4 KiB."""
        spec = self._spec(name)
        return self._read(name, 0, spec.nbytes, out).view(to_torch(spec.dtype)).reshape(spec.shape)

    def row_bytes(self, name: str) -> int:
        """Bytes of one row (one index of the first dimension) of tensor `name`."""
        spec = self._spec(name)
        rows = spec.shape[0] if spec.shape else 1
        return spec.nbytes // max(rows, 1)

    def load_rows(
        self, name: str, first: int, end: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows [first, end) of tensor `name` (its first dimension) in its stored dtype, read
        on their own: a tensor too large to hold once per input is read a block of rows at a
        time. `out`: a reused uint8 buffer of at least those rows' bytes."""
        spec = self._spec(name)
        rows = spec.shape[0] if spec.shape else 1
        if not 0 <= first <= end <= rows:
            raise TvqError(f"{self.path}: tensor {name} has no rows {first}:{end}")
        size = self.row_bytes(name)
        buffer = self._read(name, first * size, (end - first) * size, out)
        return buffer.view(to_torch(spec.dtype)).reshape(end - first, *spec.shape[1:])

    def _spec(self, name: str) -> TensorSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise TvqError(f"{self.path}: no tensor named {name}") from None

    def _read(self, name: str, offset: int, count: int, out: torch.Tensor | None) -> torch.Tensor:
        """`count` bytes of tensor `name` from `offset` into `out` (or a fresh buffer)."""
        file, start, _ = self._where[name]
        buffer = torch.empty(count, dtype=torch.uint8) if out is None else out[:count]
        try:
            pread_into(self._open(file).fileno(), memoryview(buffer.numpy()), start + offset)
        except EOFError:
            raise TvqError(
                f"{file}: ended while reading tensor {name} "
                "(the file was truncated or replaced while being read)"
            ) from None
        except OSError as exc:
            raise TvqError(f"{file}: cannot read tensor {name} ({exc.strerror})") from None
        return buffer

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
        return require_finite(self.load(name).to(torch.float32), self.path, name)

    def fingerprint(self) -> str:
        """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
        return combine_digests({name: tensor_digest(name, self.load(name)) for name in self.specs})


def _data_places(file: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte offset and size of every tensor in a safetensors file (header checked by
    the safetensors library before this is called)."""
    doc, start = read_header(file)
    try:
        return data_places(doc, start)
    except (ValueError, KeyError, TypeError) as exc:
        raise TvqError(f"{file}: not a readable safetensors file ({exc})") from None


def combine_digests(digests: dict[str, bytes]) -> str:
    """Fold per-tensor digests (any processing order) into one checkpoint fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(digests[name])
    return "sha256:" + digest.hexdigest()


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """One tensor's contribution to a checkpoint fingerprint."""
    digest = digest_start(name, from_torch(tensor.dtype), tensor.shape)
    digest.update(tensor_bytes(tensor))
    return digest.digest()


def digest_start(name: str, dtype: str, shape) -> hashlib._Hash:
    """`tensor_digest`'s hash before the tensor's bytes: fed its rows in order (`update`), it
    ends in the same digest, for a tensor read a block of rows at a time."""
    spec = f"{name}\0{dtype}\0{list(shape)}\0"
    return hashlib.sha256(spec.encode())
