"""Archive reader: checks the file against its header, verifies checksums on every read.

Everything the reader hands out has been checked: the header's own checksum, that the file
holds exactly the stored tensors the header implies (keys, dtypes, sizes, offsets inside the
file), and each stored tensor's crc32 every time it is read. Damage raises TvqError, never a
crash and never silently wrong numbers. Stored tensors are read with pread, not through a
memory map: a file truncated under a map kills the process with SIGBUS, and touched pages of a
map stay in the process's resident memory until it is closed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..dtypes import DTYPES, to_torch
from ..errors import TvqError
from ..io.safetensors_file import MAX_HEADER_BYTES, pread_into
from ..quant.quantizer import dequantize
from ..quant.spec import Quantized
from . import schemes
from .container import crc32, decode_header
from .format import ArchiveHeader, Part, StoredTensor, TensorEntry, delta_key, layout
from .format import shared_key as _shared_key
from .parts import decode_part


class Archive:
    """An open archive. Tensors are read lazily; nothing is loaded until asked for.

    One class on purpose: it is the only gate to an archive's bytes, so that everything it
    hands out (raw bytes, decoded parts, task vectors) has passed the same checks.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open to read
            size = os.fstat(self._file.fileno()).st_size
            prefix = _read_prefix(self._file, min(size, 8 + MAX_HEADER_BYTES))
        except FileNotFoundError:
            raise TvqError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise TvqError(f"{self.path}: is a folder, not an archive") from None
        except OSError as exc:
            raise TvqError(f"{self.path}: cannot read ({exc.strerror})") from None
        try:
            entries, header, checksums, data_start = decode_header(prefix, size)
        except TvqError as exc:
            raise TvqError(f"{self.path}: {exc}") from None
        self.header: ArchiveHeader = header
        self.header_bytes = data_start
        self.file_size = size
        self.stored: list[StoredTensor] = layout(header)
        self._checksums = checksums
        self._offsets: dict[str, tuple[int, int]] = {}
        self._check_entries(entries, size - data_start)
        self.entries: dict[str, TensorEntry] = {t.name: t for t in header.tensors}
        self.scheme: schemes.Scheme = schemes.get(header.scheme)

    def _check_entries(self, entries: dict, payload: int) -> None:
        expected = {s.key: s for s in self.stored}
        extra = set(entries) - set(expected)
        if extra:
            raise TvqError(f"{self.path}: unexpected stored tensor {sorted(extra)[0]}")
        for key, s in expected.items():
            info = entries.get(key)
            if not isinstance(info, dict):
                raise TvqError(f"{self.path}: stored tensor {key} is missing (damaged archive)")
            try:
                start, end = (int(v) for v in info["data_offsets"])
                ok = info["dtype"] == s.dtype and list(info["shape"]) == list(s.shape)
            except (KeyError, TypeError, ValueError, OverflowError):
                ok = False
            if not ok or not 0 <= start <= end <= payload or end - start != s.nbytes:
                raise TvqError(f"{self.path}: stored tensor {key} has the wrong size or place")
            if key not in self._checksums:
                raise TvqError(f"{self.path}: stored tensor {key} has no checksum")
            self._offsets[key] = (self.header_bytes + start, self.header_bytes + end)

    # --- raw access -------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return self.header.tasks

    def raw(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """The bytes of one stored tensor as a uint8 array, read now and checksum verified
        (into `out`, a reused buffer of at least `nbytes(key)` bytes, where given)."""
        try:
            start, end = self._offsets[key]
        except KeyError:
            raise TvqError(f"{self.path}: no stored tensor {key}") from None
        data = np.empty(end - start, np.uint8) if out is None else out[: end - start]
        view = memoryview(data)
        try:
            pread_into(self._file.fileno(), view, start)
        except EOFError:
            raise TvqError(f"{self.path}: the file ended early (truncated while open)") from None
        except OSError as exc:
            raise TvqError(f"{self.path}: cannot read {key} ({exc.strerror})") from None
        if crc32(view) != self._checksums[key]:
            raise TvqError(f"{self.path}: checksum mismatch in {key} (the file is damaged)")
        return data

    def nbytes(self, key: str) -> int:
        start, end = self._offsets[key]
        return end - start

    def close(self) -> None:
        self._file.close()

    def array(self, key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.raw(key).view(DTYPES[dtype].numpy).reshape(shape)

    def verify(self) -> int:
        """Read and check every stored tensor and every decoded range; raises TvqError on the
        first damage. Returns the number of payload bytes checked."""
        for s in self.stored:
            self.raw(s.key)
        for entry in self.header.tensors:
            if entry.kind == "quantized":
                for part in entry.parts:
                    self.quantized(part, entry)  # decodes codes, checks scales
            elif entry.kind == "exact":
                for task in self.tasks:
                    self._delta(task, entry)
        return sum(s.nbytes for s in self.stored)

    # --- decoded access ---------------------------------------------------------------------
    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise TvqError(f"{self.path}: archive has no tensor {name}") from None

    def quantized(self, part: Part, entry: TensorEntry) -> Quantized:
        return decode_part(part, entry, self.raw, str(self.path))

    def _delta(self, task: str, entry: TensorEntry) -> np.ndarray:
        key = delta_key(task, entry.name)
        delta = self.array(key, "F32", entry.shape)
        if not np.isfinite(delta).all():
            raise TvqError(f"{self.path}: NaN or Inf in {key} (damaged archive)")
        return delta

    def dequantized(self, part: Part, entry: TensorEntry) -> torch.Tensor:
        return dequantize(self.quantized(part, entry), part.spec, entry.shape)

    def shared(self, name: str) -> torch.Tensor:
        """A non-float tensor stored once (identical in every input)."""
        entry = self.entry(name)
        tensor = torch.from_numpy(self.raw(_shared_key(name)))
        return tensor.view(to_torch(entry.dtype)).reshape(entry.shape)

    def task_vector(
        self, task: str, name: str, pretrained: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The reconstructed fp32 task vector of one task for one float tensor.

        FQ archives store fine-tuned weights, so they need the pretrained tensor to subtract.
        """
        if task not in self.header.tasks:
            raise TvqError(f"{self.path}: no task named {task!r} (has {', '.join(self.tasks)})")
        entry = self.entry(name)
        if entry.kind == "shared":
            raise TvqError(f"{name} is not a float tensor; it has no task vector")
        if entry.kind == "exact":
            return torch.from_numpy(self._delta(task, entry))
        parts = {p.role: p for p in entry.parts}
        return self.scheme.decode(
            task, lambda role: self.dequantized(parts[role], entry), pretrained
        )


def _read_prefix(file, size: int) -> bytes:
    """The first `size` bytes (fewer only if the file shrank meanwhile: the checks catch it)."""
    chunks, done = [], 0
    while done < size:
        chunk = file.read(size - done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def open_archive(path: Path | str) -> Archive:
    """Open and check an archive (header, layout); tensor checksums are verified on read."""
    return Archive(path)
