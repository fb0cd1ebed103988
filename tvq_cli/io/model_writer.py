"""Writing merged models: one .safetensors file, or a Hugging Face style folder.

Tensors are streamed: every name, dtype and shape is known before the first weight is merged,
so each safetensors header is written up front and tensors are appended one at a time (never
the whole model in memory), a large one a block of rows at a time (`write_rows`). A folder
gets the pretrained folder's companion files (config, tokenizer, ...: an allow-list,
`model_files`) and, when it exceeds the shard size, `model-0000i-of-0000N.safetensors` shards
with a `model.safetensors.index.json` as `save_pretrained` writes them. Everything is written
under a hidden temporary name beside the target and renamed into place only when complete
(`atomic`), through `SequentialFile` (O_DIRECT where the system allows it).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from ..dtypes import to_torch
from ..errors import InternalError, TvqError
from ..tensors import tensor_bytes
from .checkpoint import INDEX_FILE, SINGLE_FILE, TensorSpec
from .model_files import copy_companions
from .safetensors_file import encode_header
from .sequential import SequentialFile

DEFAULT_MAX_SHARD = 5 * 10**9  # save_pretrained's historical default, "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str | int) -> int:
    """Bytes from '5GB', '500MB', '2GiB' or a plain integer (decimal units as in transformers)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
        if not match or match.group(2) not in _UNITS:
            raise TvqError(f"invalid size {text!r}: use e.g. 5GB, 500MB, 2GiB or a byte count")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise TvqError(f"size must be positive, got {text!r}")
    return value


class SafetensorsStream:
    """One safetensors file whose tensors are declared up front and appended in order."""

    def __init__(self, path: Path, specs: dict[str, TensorSpec], metadata: dict[str, str]):
        self.path = path
        self.specs = specs
        self._order = list(specs)
        self._next = 0
        self._rows = 0  # rows of the next tensor written so far (`write_rows`)
        header = encode_header(
            ((name, s.dtype, s.shape, s.nbytes) for name, s in specs.items()), metadata
        )
        self.nbytes = len(header) + sum(s.nbytes for s in specs.values())
        self._file = SequentialFile(path)  # closed (and fsynced) in close()
        self._file.write(header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._expect(name)
        if self._rows or tuple(tensor.shape) != spec.shape or tensor.dtype != to_torch(spec.dtype):
            raise InternalError(f"{name} has the wrong shape or dtype")
        self._file.write(tensor_bytes(tensor))
        self._next += 1

    def write_rows(self, name: str, rows: torch.Tensor) -> None:
        """Append the next rows (first dimension) of tensor `name`: a tensor too large to
        hold whole is written a block of rows at a time, in order; it is complete with its
        last row."""
        spec = self._expect(name)
        fits = spec.shape and self._rows + rows.shape[0] <= spec.shape[0]
        if (
            not fits
            or tuple(rows.shape[1:]) != spec.shape[1:]
            or rows.dtype != to_torch(spec.dtype)
        ):
            raise InternalError(f"rows of {name} have the wrong shape or dtype")
        self._file.write(tensor_bytes(rows))
        self._rows += rows.shape[0]
        if self._rows == spec.shape[0]:
            self._rows = 0
            self._next += 1

    def _expect(self, name: str) -> TensorSpec:
        """The spec of `name`, the tensor to write next."""
        expected = self._order[self._next] if self._next < len(self._order) else None
        spec = self.specs.get(name)
        if name != expected or spec is None:
            raise InternalError(f"wrote {name}, expected {expected}")
        return spec

    @property
    def complete(self) -> bool:
        return self._next == len(self._order)

    def discard(self) -> None:
        self._file.abandon()

    def close(self) -> None:
        self._file.close()


def shard_plan(specs: dict[str, TensorSpec], max_bytes: int) -> list[dict[str, TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_bytes` (a larger tensor stands alone).

    Same greedy rule as transformers' `save_pretrained`.
    """
    shards: list[dict[str, TensorSpec]] = [{}]
    size = 0
    for name, spec in specs.items():
        nbytes = spec.nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = spec
        size += nbytes
    return shards


class ModelWriter:
    """Stream one model to `path`: a .safetensors file, or a folder (sharded when large)."""

    def __init__(
        self,
        path: Path,
        specs: dict[str, TensorSpec],
        *,
        folder: bool,
        max_shard_bytes: int = DEFAULT_MAX_SHARD,
        copy_from: Path | None = None,
        dtype: str | None = None,
    ):
        """`copy_from`: a folder whose companion files the output folder gets; `dtype`: the
        floats' dtype, when it differs from that folder's (config.json is updated)."""
        self.path = path
        self.metadata = {"format": "pt"}
        self._where: dict[str, SafetensorsStream] = {}
        self.files: list[Path] = []  # the weight files and the index
        if not folder:
            shards = [specs]
            names = [path]
        else:
            path.mkdir(parents=True, exist_ok=True)
            if copy_from is not None:
                copy_companions(copy_from, path, dtype)
            shards = shard_plan(specs, max_shard_bytes)
            n = len(shards)
            names = (
                [path / SINGLE_FILE]
                if n == 1
                else [path / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
            )
        self._pending = list(zip(names, shards, strict=True))
        self._streams: list[SafetensorsStream] = []
        self._index = (
            {name: file.name for file, shard in self._pending for name in shard}
            if len(shards) > 1
            else None
        )
        self._total = sum(s.nbytes for s in specs.values())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (in the order of `specs`)."""
        self._stream(name).write(name, tensor)

    def write_rows(self, name: str, rows: torch.Tensor) -> None:
        """Append the next rows of the next tensor (`SafetensorsStream.write_rows`)."""
        self._stream(name).write_rows(name, rows)

    def _stream(self, name: str) -> SafetensorsStream:
        """The file that `name` goes to, opened when the previous one is complete."""
        if not self._streams or self._streams[-1].complete:
            if not self._pending:
                raise InternalError(f"unexpected tensor {name}")
            file, shard = self._pending.pop(0)
            if self._streams:
                self._streams[-1].close()
            self._streams.append(SafetensorsStream(file, shard, self.metadata))
            self.files.append(file)
        return self._streams[-1]

    @property
    def shards(self) -> list[tuple[Path, dict[str, TensorSpec]]]:
        """Every weight file still to write and its tensors, for writers of their own (a
        `SafetensorsStream` each, e.g. in the workers of a distributed merge: `adopt`)."""
        return list(self._pending)

    def adopt(self) -> None:
        """Every file of `shards` was written by a writer of its own: finishing writes the
        index."""
        if self._streams:
            raise InternalError("a model is written either here or shard by shard elsewhere")
        self.files += [file for file, _ in self._pending]
        self._pending = []

    def finish(self) -> None:
        if self._pending or not self.files or (self._streams and not self._streams[-1].complete):
            raise InternalError("the merged model is incomplete")
        if self._streams:
            self._streams[-1].close()
        if self._index is not None:
            doc = {"metadata": {"total_size": self._total}, "weight_map": self._index}
            index = self.path / INDEX_FILE
            index.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            self.files.append(index)

    def abort(self) -> None:
        """Close every file without flushing to disk (which may be what failed)."""
        for stream in self._streams:
            with contextlib.suppress(OSError):
                stream.discard()
