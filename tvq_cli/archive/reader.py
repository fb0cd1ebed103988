"""Archive reader: checks the file against its header, verifies checksums on every read.

Everything the reader hands out has been checked: the header's own checksum, that the file
holds exactly the stored tensors the header implies (keys, dtypes, sizes, offsets inside the
file), and each stored tensor's crc32 every time it is read. Damage raises TvqError, never a
crash and never silently wrong numbers. Stored tensors are read with pread, not through a
memory map: a file truncated under a map kills the process with SIGBUS, and touched pages of a
map stay in the process's resident memory until it is closed.

Opening an archive reads and checks its header only, with the standard library: numpy, torch
and the decoders are imported by the methods that read tensors, so `tvq inspect` starts fast.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import DTYPES, to_torch
from ..errors import InternalError, TvqError
from ..io.safetensors_file import pread_into, read_prefix
from . import schemes
from .container import INDEX_SUFFIX, crc32, decode_header, decode_index, decode_shard_header
from .format import (
    ArchiveHeader,
    Part,
    StoredTensor,
    TaskInfo,
    TensorEntry,
    delta_key,
    file_key,
    frame_key,
    framed_entries,
    layout,
    record_key,
    rows_key,
)
from .format import shared_key as _shared_key

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..io.checkpoint import Checkpoint
    from ..quant import dzans
    from ..quant.spec import Quantized


def locate(path: Path) -> tuple[Path, bool]:
    """The archive file, or the index of a sharded archive (a folder, or its index file)."""
    if path.is_dir():
        indexes = sorted(path.glob("*" + INDEX_SUFFIX))
        if len(indexes) != 1:
            found = "none" if not indexes else ", ".join(i.name for i in indexes)
            raise TvqError(
                f"{path}: is a folder, not an archive (a sharded archive folder holds one "
                f"*{INDEX_SUFFIX}; found {found})"
            )
        return indexes[0], True
    return path, path.name.endswith(INDEX_SUFFIX)


@dataclass
class _File:
    """One file of an archive: a single-file archive, or one shard."""

    path: Path
    handle: object
    size: int
    data_start: int


class Archive:
    """An open archive, one file or sharded. Tensors are read lazily; nothing is loaded until
    asked for.

    One class on purpose: it is the only gate to an archive's bytes, so that everything it
    hands out (raw bytes, decoded parts, task vectors) has passed the same checks.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._files: list[_File] = []
        self._checksums: dict[str, int] = {}
        self._offsets: dict[str, tuple[int, int, int]] = {}  # key -> (file, start, end)
        try:
            main, sharded = locate(self.path)
            if sharded:
                self.max_shard_bytes: int | None = self._open_sharded(main)
            else:
                self.max_shard_bytes = None
                self._open_single(main)
        except BaseException:
            self.close()
            raise
        self.stored: list[StoredTensor] = layout(self.header)
        self._check_entries()
        self.entries: dict[str, TensorEntry] = {t.name: t for t in self.header.tensors}
        self.scheme: schemes.Scheme = schemes.get(self.header.scheme)
        self._frames: dict[str, dict[str, dzans.RecordInfo]] = {}  # role -> parsed records
        self._frames_lock = threading.Lock()

    @property
    def sharded(self) -> bool:
        return self.max_shard_bytes is not None

    @property
    def root(self) -> Path:
        """What a rewrite replaces: the file, or the folder of a sharded archive."""
        return self._files[0].path.parent if self.sharded else self._files[0].path

    @property
    def paths(self) -> list[Path]:
        """Every file of the archive (the index of a sharded one included)."""
        return [*(f.path for f in self._files), *self._index]

    def _open(self, path: Path) -> tuple[object, int, bytes]:
        try:
            handle = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open to read
        except FileNotFoundError:
            raise TvqError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise TvqError(f"{path}: is a folder, not an archive") from None
        except OSError as exc:
            raise TvqError(f"{path}: cannot read ({exc.strerror})") from None
        try:
            size = os.fstat(handle.fileno()).st_size
            prefix = read_prefix(handle, size)
        except OSError as exc:
            handle.close()
            raise TvqError(f"{path}: cannot read ({exc.strerror})") from None
        return handle, size, prefix

    def _open_single(self, path: Path) -> None:
        self._index: list[Path] = []
        handle, size, prefix = self._open(path)
        self._files.append(_File(path, handle, size, 0))
        entries, header, checksums, data_start = _about(path, decode_header, prefix, size)
        self._files[0].data_start = data_start
        self.header: ArchiveHeader = header
        self._checksums = checksums
        self._entries = {key: (0, info) for key, info in entries.items()}
        self.header_bytes = data_start
        self.file_size = size

    def _open_sharded(self, index: Path) -> int:
        self._index = [index]
        try:
            text = index.read_bytes()
        except FileNotFoundError:
            raise TvqError(f"{index}: no such file") from None
        except OSError as exc:
            raise TvqError(f"{index}: cannot read ({exc.strerror})") from None
        header, header_crc, weight_map, max_shard = _about(index, decode_index, text)
        self.header = header
        names = sorted(set(weight_map.values()))
        self._entries = {}
        self.header_bytes = self.file_size = len(text)
        for number, name in enumerate(names, start=1):
            path = index.parent / name
            handle, size, prefix = self._open(path)
            self._files.append(_File(path, handle, size, 0))
            entries, place, checksums, data_start = _about(path, decode_shard_header, prefix, size)
            if place != {"shard": number, "of": len(names), "header_crc32": header_crc}:
                raise TvqError(
                    f"{path}: is not shard {number} of {len(names)} of the archive its index "
                    "describes (a shard of another archive, or of an earlier version of it)"
                )
            for key, info in entries.items():
                if weight_map.get(key) != name:
                    raise TvqError(f"{path}: holds {key}, which the index places elsewhere")
                self._entries[key] = (number - 1, info)
            self._files[-1].data_start = data_start
            self._checksums.update(checksums)
            self.header_bytes += data_start
            self.file_size += size
        missing = set(weight_map) - set(self._entries)
        if missing:
            raise TvqError(f"{index}: stored tensor {sorted(missing)[0]} is in no shard")
        return max_shard

    def _check_entries(self) -> None:
        expected = {s.key: s for s in self.stored}
        extra = set(self._entries) - set(expected)
        if extra:
            raise TvqError(f"{self.path}: unexpected stored tensor {sorted(extra)[0]}")
        for key, s in expected.items():
            file_index, info = self._entries.get(key, (0, None))
            if not isinstance(info, dict):
                raise TvqError(f"{self.path}: stored tensor {key} is missing (damaged archive)")
            file = self._files[file_index]
            payload = file.size - file.data_start
            try:
                start, end = (int(v) for v in info["data_offsets"])
                ok = info["dtype"] == s.dtype and list(info["shape"]) == list(s.shape)
            except (KeyError, TypeError, ValueError, OverflowError):
                ok = False
            if not ok or not 0 <= start <= end <= payload or end - start != s.nbytes:
                raise TvqError(f"{self.path}: stored tensor {key} has the wrong size or place")
            if key not in self._checksums:
                raise TvqError(f"{self.path}: stored tensor {key} has no checksum")
            self._offsets[key] = (file_index, file.data_start + start, file.data_start + end)
        del self._entries

    # --- raw access -------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return self.header.tasks

    def raw(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """The bytes of one stored tensor as a uint8 array, read now and checksum verified
        (into `out`, a reused buffer of at least `nbytes(key)` bytes, where given)."""
        import numpy as np

        try:
            file_index, start, end = self._offsets[key]
        except KeyError:
            raise TvqError(f"{self.path}: no stored tensor {key}") from None
        data = np.empty(end - start, np.uint8) if out is None else out[: end - start]
        view = memoryview(data)
        self._pread(key, file_index, view, start)
        self._check_crc(key, crc32(view))
        return data

    def stream(self, key: str) -> StoredStream:
        """The bytes of one stored tensor read in order, a piece at a time: merge's large
        tensors, whose stored bytes of every task would not fit in memory at once. Its
        checksum is verified when its last byte is read; until then what was read is unchecked
        (a merge fails before its output is in place)."""
        if key not in self._offsets:
            raise TvqError(f"{self.path}: no stored tensor {key}")
        return StoredStream(self, key)

    def _pread(self, key: str, file_index: int, view: memoryview, offset: int) -> None:
        try:
            pread_into(self._files[file_index].handle.fileno(), view, offset)
        except EOFError:
            raise TvqError(f"{self.path}: the file ended early (truncated while open)") from None
        except OSError as exc:
            raise TvqError(f"{self.path}: cannot read {key} ({exc.strerror})") from None

    def _check_crc(self, key: str, crc: int) -> None:
        if crc != self._checksums[key]:
            raise TvqError(f"{self.path}: checksum mismatch in {key} (the file is damaged)")

    def nbytes(self, key: str) -> int:
        _, start, end = self._offsets[key]
        return end - start

    def close(self) -> None:
        for file in self._files:
            file.handle.close()

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
                    if part.dense:
                        self.quantized(part, entry)  # decodes codes, checks scales
                    else:
                        self.dequantized(part, entry)  # decodes and checks the record
            elif entry.kind == "exact":
                for task in self.tasks:
                    self._delta(task, entry)
        for task in self.tasks:
            for path in self.info(task).files:
                self.task_file(task, path)
            for name in self.info(task).rows:
                self.added_rows(task, name)
        return sum(s.nbytes for s in self.stored)

    # --- decoded access ---------------------------------------------------------------------
    def info(self, task: str) -> TaskInfo:
        """What the archive records of a task's original checkpoint."""
        self._check_task(task)
        return self.header.info(task)

    def _check_task(self, task: str) -> None:
        if task not in self.header.tasks:
            raise TvqError(f"{self.path}: no task named {task!r} (has {', '.join(self.tasks)})")

    def added_rows(self, task: str, name: str) -> torch.Tensor | None:
        """The rows a task added past the pretrained tensor's (new tokens), exactly as in its
        checkpoint, in its dtype; None when it added none."""
        import torch

        info = self.info(task)
        if name not in info.rows:
            return None
        entry = self.entry(name)
        dtype = info.dtype_of(entry)
        shape = (info.rows[name], *entry.shape[1:])
        rows = torch.from_numpy(self.raw(rows_key(task, name))).view(to_torch(dtype)).reshape(shape)
        if rows.is_floating_point() and not torch.isfinite(rows).all():
            raise TvqError(f"{self.path}: NaN or Inf in {rows_key(task, name)} (damaged archive)")
        return rows

    def task_file(self, task: str, path: str) -> bytes:
        """One stored non-weight file of a task (config.json, tokenizer.json, ...), checked
        against its sha256."""
        from ..quant import entropy

        sha = self.info(task).files.get(path)
        if sha is None:
            raise TvqError(f"{self.path}: task {task!r} has no stored file {path}")
        blob = self.header.files[sha]
        try:
            data = entropy.decompress(self.raw(file_key(sha)), blob.size)
        except TvqError as exc:
            raise TvqError(f"{self.path}: stored file {path} of task {task!r}: {exc}") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise TvqError(f"{self.path}: stored file {path} of task {task!r} is damaged")
        return data

    def check_model(self, pretrained: Checkpoint) -> None:
        """The archive describes exactly the pretrained checkpoint's tensors, shapes and
        dtypes (its fingerprint is a separate, slower check)."""
        specs = pretrained.specs
        for entry in self.header.tensors:
            spec = specs.get(entry.name)
            if spec is None:
                raise TvqError(
                    f"{self.path}: tensor {entry.name} is not in {pretrained.path} "
                    "(packed from a different model?)"
                )
            if spec.shape != entry.shape or spec.dtype != entry.dtype:
                raise TvqError(
                    f"{self.path}: tensor {entry.name} is {entry.dtype}{list(entry.shape)} "
                    f"but {spec.dtype}{list(spec.shape)} in {pretrained.path}"
                )
        missing = set(specs) - set(self.entries)
        if missing:
            raise TvqError(f"{self.path}: has no tensor {sorted(missing)[0]} of {pretrained.path}")

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise TvqError(f"{self.path}: archive has no tensor {name}") from None

    def quantized(self, part: Part, entry: TensorEntry) -> Quantized:
        """A dense part's codes, scales and zero-points."""
        from .parts import decode_part

        if not part.dense:
            raise InternalError(f"{part.role} of {entry.name} is low-rate: it has no dense codes")
        return decode_part(part, entry, self.raw, str(self.path))

    def record(self, part: Part, entry: TensorEntry) -> dzans.RecordInfo:
        """A low-rate part's parsed record (side information and streams, checked on decode)."""
        from ..quant import dzans

        if entry.framed:
            return self._frame(part.role)[entry.name]
        key = record_key(part, entry.name)
        data = self.raw(key)
        info = self._parsed(key, lambda: dzans.parse(data, 0, entry.rows))
        if info.end != data.size:
            raise TvqError(f"{self.path}: {key} has bytes past its record (damaged archive)")
        return info

    def _frame(self, role: str) -> dict[str, dzans.RecordInfo]:
        """The records of a role's frame by tensor name, read and parsed once."""
        from ..quant import dzans

        with self._frames_lock:
            if role not in self._frames:
                key = frame_key(role)
                data = self.raw(key)
                records, pos = {}, 0
                for entry in framed_entries(self.header, role):
                    info = self._parsed(key, lambda e=entry, at=pos: dzans.parse(data, at, e.rows))
                    records[entry.name], pos = info, info.end
                if pos != data.size:
                    raise TvqError(
                        f"{self.path}: {key} has bytes past its records (damaged archive)"
                    )
                self._frames[role] = records
            return self._frames[role]

    def _parsed(self, key: str, parse):
        try:
            return parse()
        except TvqError as exc:
            raise TvqError(f"{self.path}: {key}: {exc}") from None

    def _low_rate(self, part: Part, entry: TensorEntry) -> torch.Tensor:
        import torch

        from ..quant import dzans

        info = self.record(part, entry)
        cols = entry.shape[-1] if entry.shape else 1
        where = frame_key(part.role) if entry.framed else record_key(part, entry.name)
        values = self._parsed(where, lambda: dzans.decode(info, entry.rows, cols))
        return torch.from_numpy(values).reshape(entry.shape)

    def _delta(self, task: str, entry: TensorEntry) -> np.ndarray:
        import numpy as np

        key = delta_key(task, entry.name)
        delta = self.array(key, "F32", entry.shape)
        if not np.isfinite(delta).all():
            raise TvqError(f"{self.path}: NaN or Inf in {key} (damaged archive)")
        return delta

    def dequantized(self, part: Part, entry: TensorEntry) -> torch.Tensor:
        """A part's fp32 values, in the entry's shape."""
        from ..quant.quantizer import dequantize

        if not part.dense:
            return self._low_rate(part, entry)
        return dequantize(self.quantized(part, entry), part.spec, entry.shape)

    def shared(self, name: str) -> torch.Tensor:
        """A non-float tensor stored once (identical in every input)."""
        import torch

        entry = self.entry(name)
        tensor = torch.from_numpy(self.raw(_shared_key(name)))
        return tensor.view(to_torch(entry.dtype)).reshape(entry.shape)

    def task_vector(
        self, task: str, name: str, pretrained: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The reconstructed fp32 task vector of one task for one float tensor.

        FQ archives store fine-tuned weights, so they need the pretrained tensor to subtract.
        """
        import torch

        self._check_task(task)
        entry = self.entry(name)
        if entry.kind == "shared":
            raise TvqError(f"{name} is not a float tensor; it has no task vector")
        if entry.kind == "exact":
            return torch.from_numpy(self._delta(task, entry))
        parts = {p.role: p for p in entry.parts}
        return self.scheme.decode(
            task, lambda role: self.dequantized(parts[role], entry), pretrained
        )


def _about(path: Path, decode, *args):
    """`decode(*args)`, its errors prefixed with the file they are about."""
    try:
        return decode(*args)
    except TvqError as exc:
        raise TvqError(f"{path}: {exc}") from None


def open_archive(path: Path | str) -> Archive:
    """Open and check an archive (header, layout); tensor checksums are verified on read."""
    return Archive(path)


class StoredStream:
    """`Archive.stream`: one stored tensor's bytes in order (`read(n)`: the next n bytes, in a
    buffer reused by the next read), its crc32 running and checked with the last byte."""

    def __init__(self, archive: Archive, key: str):
        import numpy as np

        self.archive, self.key = archive, key
        self._file, self._at, self._end = archive._offsets[key]
        self._crc = 0
        self._buffer = np.empty(0, np.uint8)

    @property
    def left(self) -> int:
        return self._end - self._at

    def read(self, n: int) -> np.ndarray:
        import numpy as np

        if not 0 <= n <= self.left:
            raise InternalError(f"read {n} bytes of {self.key}, {self.left} are left")
        if self._buffer.size < n:
            self._buffer = np.empty(n, np.uint8)
        data = self._buffer[:n]
        view = memoryview(data)
        self.archive._pread(self.key, self._file, view, self._at)
        self._crc = zlib.crc32(view, self._crc)
        self._at += n
        if not self.left:
            self.archive._check_crc(self.key, self._crc & 0xFFFFFFFF)
        return data
