"""Streaming archive writer: header first, payload tensor by tensor, checksums patched last.

One file: written to a hidden temporary file beside the target and renamed into place only when
every stored tensor has been written (`io.atomic.AtomicFile`). Sharded (`max_shard_bytes`):
`NAME-0000k-of-0000n.tvq` shards and `NAME.tvq.index.json` in a folder staged beside the target
and renamed into place whole (`io.atomic.atomic_output`). Either way an error or an interrupt
never leaves a partial archive, and never touches the one being replaced.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import InternalError, TvqError
from ..io.atomic import AtomicFile, atomic_output
from ..quant import sizes
from .container import (
    INDEX_SUFFIX,
    crc32,
    encode_header,
    encode_index,
    encode_shard_header,
)
from .format import (
    ArchiveHeader,
    StoredTensor,
    bound_header,
    frame_key,
    layout,
    part_keys,
    record_key,
)

if TYPE_CHECKING:
    import numpy as np

SHARD_SUFFIX = ".tvq"


def reserved_header_length(header: ArchiveHeader) -> int:
    """Bytes the writer reserves for the header: its length with coded sizes at their bound."""
    bound = bound_header(header)
    return len(encode_header(bound, layout(bound), {}))


def archive_size(header: ArchiveHeader) -> int:
    """Exact size in bytes of the one-file archive `header` describes (used by --dry-run).

    For entropy-coded parts the header must carry their real coded sizes.
    """
    return reserved_header_length(header) + sum(s.nbytes for s in layout(header))


def plan_shards(stored: list[StoredTensor], max_bytes: int) -> list[list[StoredTensor]]:
    """Stored tensors, in order, in shards of at most `max_bytes` of payload (a larger tensor
    stands alone): the rule of transformers' `save_pretrained`."""
    shards: list[list[StoredTensor]] = [[]]
    size = 0
    for s in stored:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(folder: Path, count: int) -> tuple[list[str], str]:
    """File names of `count` shards and of the index in a sharded archive folder."""
    stem = folder.name.removesuffix(SHARD_SUFFIX)
    shards = [f"{stem}-{i:05d}-of-{count:05d}{SHARD_SUFFIX}" for i in range(1, count + 1)]
    return shards, stem + INDEX_SUFFIX


@dataclass
class ShardTarget:
    """One shard file of a sharded archive being written: its stored tensors in order (coded
    sizes at their bound), the keys among them that are entropy-coded (shorter allowed), and
    the bytes reserved for its header."""

    path: Path
    stored: list[StoredTensor]
    coded: frozenset[str]
    reserve: int

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.stored]


def checked_view(
    key: str, data: np.ndarray | bytes | memoryview, expected: StoredTensor, coded: bool
) -> memoryview:
    """`data` as bytes, checked to be the stored tensor `expected` (an entropy-coded one may be
    shorter than its bound)."""
    import numpy as np  # not at import: header-only commands load this module's package

    view = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data)
    view = view.cast("B") if view.ndim != 1 or view.format != "B" else view
    size_ok = view.nbytes <= expected.nbytes if coded else view.nbytes == expected.nbytes
    if key != expected.key or not size_ok:
        raise InternalError(
            f"wrote {key} ({view.nbytes} bytes), expected {expected.key} ({expected.nbytes} bytes)"
        )
    return view


class ShardWriter:
    """One shard of a sharded archive written on its own, e.g. by a worker of a distributed
    pack (`pack.distributed`): its stored tensors after the reserved header, which the
    `ArchiveWriter` that planned the shard writes once every shard is written (`adopt`).
    Stored tensors of other shards handed to `write` are skipped."""

    def __init__(self, target: ShardTarget):
        self.target = target
        self.checksums: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self._keys = set(target.keys)
        self._next = 0
        self._file: BinaryIO | None = None

    def __enter__(self) -> ShardWriter:
        try:
            self._file = open(self.target.path, "wb")  # noqa: SIM115 - closed in __exit__
            self._file.write(b"\0" * self.target.reserve)
        except OSError as exc:
            raise TvqError(f"cannot write {self.target.path}: {exc.strerror}") from None
        return self

    def write(self, key: str, data: np.ndarray | bytes | memoryview) -> None:
        if key not in self._keys:
            return
        if self._next >= len(self.target.stored):
            raise InternalError(f"unexpected tensor {key}")
        view = checked_view(key, data, self.target.stored[self._next], key in self.target.coded)
        self.checksums[key] = crc32(view)
        self.sizes[key] = view.nbytes
        try:
            self._file.write(view)
        except OSError as exc:
            raise TvqError(f"cannot write {self.target.path}: {exc.strerror}") from None
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if exc_type is None and self._next != len(self.target.stored):
            missing = self.target.stored[self._next].key
            raise InternalError(f"shard {self.target.path.name} incomplete, {missing} missing")


class ArchiveWriter:
    """Write an archive whose every stored tensor is known up front from its header.

    Entropy-coded codes may be shorter than their planned bound; their real sizes are put into
    `header` (its parts' `coded_nbytes`) when the archive is finished. With `max_shard_bytes`
    the archive is a folder of shards (docs/format.md). `replace`: the archive may replace an
    existing one.
    """

    def __init__(
        self,
        path: Path,
        header: ArchiveHeader,
        max_shard_bytes: int | None = None,
        replace: bool = False,
    ):
        self.path = Path(path)
        self.header = header
        self.max_shard_bytes = max_shard_bytes
        self.stored = layout(bound_header(header))
        # stored tensors whose size is known only once written: entropy-coded codes, low-rate
        # records stored on their own (part j of entry i), and frames of records (role)
        self._coded: dict[str, tuple[int, int] | str] = {
            (part_keys(p, t.name)[0] if p.dense else record_key(p, t.name)): (i, j)
            for i, t in enumerate(header.tensors)
            for j, p in enumerate(t.parts)
            if p.codec in sizes.CODED or not (p.dense or t.framed)
        }
        self._coded.update({frame_key(role): role for role in header.frames})
        self._sizes: dict[str, int] = {}
        self._next = 0
        self._checksums: dict[str, int] = {}
        self._file: BinaryIO | None = None
        self._target: AtomicFile | None = None
        self._folder: contextlib.AbstractContextManager | None = None  # sharded: staged
        self._shards: list[ShardTarget] = []
        self._shard_of: list[int] = []
        self._replace = replace

    def __enter__(self) -> ArchiveWriter:
        try:
            if self.max_shard_bytes is None:
                self._target = AtomicFile(self.path, self._replace)
                self._file = self._target.open()
                self._file.write(b"\0" * reserved_header_length(self.header))
            else:
                self._folder = atomic_output(self.path, folder=True, replace=self._replace)
                self._plan_shards(self._folder.__enter__())
        except BaseException as exc:
            self._discard()
            if isinstance(exc, OSError):
                raise TvqError(f"cannot write {self.path}: {exc.strerror}") from None
            raise
        return self

    def _plan_shards(self, staged: Path) -> None:
        staged.mkdir()
        planned = plan_shards(self.stored, self.max_shard_bytes)
        names, _ = shard_names(self.path, len(planned))
        for number, (name, stored) in enumerate(zip(names, planned, strict=True), start=1):
            header = encode_shard_header(stored, {}, number, len(planned), 0)
            coded = frozenset(s.key for s in stored if s.key in self._coded)
            self._shards.append(ShardTarget(staged / name, stored, coded, len(header)))
            self._shard_of += [number - 1] * len(stored)

    def write(self, key: str, data: np.ndarray | bytes | memoryview) -> None:
        """Append the next stored tensor; keys must come in layout order with exact sizes."""

        if self._next >= len(self.stored):
            raise InternalError(f"unexpected tensor {key}")
        view = checked_view(key, data, self.stored[self._next], key in self._coded)
        self._checksums[key] = crc32(view)
        self._sizes[key] = view.nbytes
        try:
            if self._shards and self._shards[self._shard_of[self._next]].stored[0].key == key:
                self._start_shard(self._shards[self._shard_of[self._next]])
            self._file.write(view)
        except OSError as exc:
            raise TvqError(f"cannot write {self.path}: {exc.strerror}") from None
        self._next += 1

    @property
    def shards(self) -> list[ShardTarget]:
        """The shards of a sharded archive, for writers of their own (`ShardWriter`)."""
        if self.max_shard_bytes is None:
            raise InternalError("only a sharded archive is written shard by shard")
        return self._shards

    def adopt(self, checksums: dict[str, int], sizes: dict[str, int]) -> None:
        """Every shard was written by a `ShardWriter` of `shards`: take their checksums and
        sizes, so that finishing writes the headers and the index."""
        missing = [s.key for s in self.stored if s.key not in checksums or s.key not in sizes]
        if self._next or missing:
            raise InternalError(f"shards incomplete: {missing[:3]} not written")
        self._checksums, self._sizes = dict(checksums), dict(sizes)
        self._next = len(self.stored)

    def _start_shard(self, shard: ShardTarget) -> None:
        self._close_file()
        self._file = open(shard.path, "wb")  # noqa: SIM115 - closed in _close_file
        self._file.write(b"\0" * shard.reserve)

    def _close_file(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def finish(self) -> None:
        if self._next != len(self.stored):
            missing = self.stored[self._next].key
            raise InternalError(f"archive incomplete, {missing} was never written")
        for key, place in self._coded.items():
            if isinstance(place, str):
                self.header.frames[place] = self._sizes[key]
                continue
            entry = self.header.tensors[place[0]]
            parts = list(entry.parts)  # entries may share one parts list
            parts[place[1]] = replace(parts[place[1]], coded_nbytes=self._sizes[key])
            entry.parts = parts
        self.stored = layout(self.header)
        try:
            if self._target is not None:
                self._file.seek(0)
                self._file.write(
                    encode_header(
                        self.header,
                        self.stored,
                        self._checksums,
                        reserve=reserved_header_length(self.header),
                    )
                )
                self._target.commit()
            else:
                self._finish_shards()
                folder, self._folder = self._folder, None
                folder.__exit__(None, None, None)  # renames the staged folder into place
        except OSError as exc:
            raise TvqError(f"cannot write {self.path}: {exc.strerror}") from None

    def _finish_shards(self) -> None:
        """Patch every shard's header now that sizes, checksums and the header are final, and
        write the index."""
        self._close_file()
        final = {s.key: s for s in self.stored}
        header_crc = crc32(self.header.to_json().encode())
        weight_map = {}
        for number, shard in enumerate(self._shards, start=1):
            stored = [final[key] for key in shard.keys]
            data = encode_shard_header(
                stored, self._checksums, number, len(self._shards), header_crc, shard.reserve
            )
            with open(shard.path, "r+b") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            weight_map.update(dict.fromkeys(shard.keys, shard.path.name))
        _, index = shard_names(self.path, len(self._shards))
        index_path = self._shards[0].path.parent / index
        with open(index_path, "w") as f:
            f.write(encode_index(self.header, weight_map, self.max_shard_bytes))
            f.flush()
            os.fsync(f.fileno())

    def _discard(self) -> None:
        if self._target is not None:
            self._target.discard()
        with contextlib.suppress(OSError):
            self._close_file()
        if self._folder is not None:  # an exception thrown in: the staged folder is removed
            folder, self._folder = self._folder, None
            folder.__exit__(InternalError, InternalError("discarded"), None)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finish()
                return
            except BaseException:
                self._discard()
                raise
        self._discard()
