"""Large tensors merged a block of rows at a time: a merge's peak memory flat in the number of
tasks and in the size of the largest tensor.

Why: the whole-tensor way holds every task's codes of the tensor (a byte per value,
`stream.CodeBuffers`) and their stored bytes, the pretrained tensor (three rotating read
buffers) and the merged one (two output buffers): for Llama-3's 128256 x 4096 embedding that is
0.5 GB per task, and 4.4 GB at T = 2 already. A float tensor whose whole way would take more
than WHOLE_LIMIT is taken in chunks of whole rows, in order, where the method is elementwise
(its statistics passes too) and every task's task vector of it is made of parts of whole groups
per row: one part (TVQ, `stream.sole_part`), kept as codes, or several (RTVQ's base plus
offset), made fp32 a chunk at a time by the scheme's own `decode`, the shared base decoded once
per chunk. Each part's codes of a chunk come from its stored bytes read in
pieces (`archive.parts.PartRows`: its zstd frame streamed, bit-packed bytes by range), the
chunk's pretrained rows are read on their own (`Checkpoint.load_rows`) and fingerprinted in
order, merged with the same arithmetic, and written in order (`ModelWriter.write_rows`). The
bytes are those of the whole tensor: the methods are elementwise, and a chunk starts on a group
boundary (groups never cross rows). Everything else keeps the whole-tensor way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..archive.format import Part, TensorEntry
from ..archive.parts import PartRows
from ..archive.reader import Archive
from ..io.checkpoint import TensorSpec
from ..quant.groups import row_group_size
from ..quant.kernel import dequantize_into
from ..quant.spec import QuantSpec
from .sources import Sources
from .stream import CodeBuffers, CodedVector, TaskVectorBuffer, sole_part

WHOLE_LIMIT = 256 << 20  # bytes the whole way may hold for one tensor before it is chunked
CHUNK_BYTES = 64 << 20  # bytes held for one chunk (the same count as WHOLE_LIMIT's)
ROW_MULTIPLE = 8  # a chunk of 8k rows fills whole bytes of every stored tensor of a part


@dataclass(frozen=True)
class Piece:
    """One step of a merge: tensor `name` whole (`rows` None), or its rows [start, stop)."""

    name: str
    rows: range | None = None
    last: bool = True  # the tensor's last piece


def plan(
    sources: Sources, name: str, spec: TensorSpec, out_itemsize: int, elementwise: bool
) -> list[Piece]:
    """Tensor `name`'s pieces: whole, or chunks of rows where the whole way costs more than
    WHOLE_LIMIT and chunks can give the same bytes (see the module's docstring)."""
    if not elementwise or len(spec.shape) != 2:
        return [Piece(name)]
    rows, cols = spec.shape
    decodable = [_by_rows(r.archive, r.task, name) for r in sources.refs]
    if None in decodable:
        return [Piece(name)]
    # per row: each task's codes (and its fp32 values where it is more than one part's codes),
    # three read buffers of its pretrained values, two of output
    tasks = sum(cols if sole else 5 * cols for sole in decodable)
    row_cost = tasks + 3 * spec.nbytes // rows + 2 * cols * out_itemsize
    if rows * row_cost <= WHOLE_LIMIT:
        return [Piece(name)]
    step = max(ROW_MULTIPLE, CHUNK_BYTES // row_cost // ROW_MULTIPLE * ROW_MULTIPLE)
    return [
        Piece(name, range(first, min(first + step, rows)), last=first + step >= rows)
        for first in range(0, rows, step)
    ]


def _by_rows(archive: Archive, task: str, name: str) -> bool | None:
    """True where `task`'s task vector of `name` is one part's codes (TVQ), False where it is
    decoded from several parts a chunk of rows at a time (RTVQ's base plus offset), None where
    it is taken whole: parts stored exact, low-rate, or whose groups do not tile the rows, and
    schemes that need the pretrained values (FQ)."""
    if sole_part(archive, task, name) is not None:
        return True
    entry = archive.entry(name)
    if entry.kind != "quantized" or len(entry.shape) != 2:
        return None
    if not archive.scheme.subtracts_pretrained:
        return None
    cols = entry.shape[-1]
    for part in _parts(archive, task, entry):
        size = row_group_size(part.group_size, cols)
        if not part.dense or size == 0 or cols % size:
            return None
    return False


def _parts(archive: Archive, task: str, entry: TensorEntry) -> list[Part]:
    """The parts `task`'s task vector of `entry` is decoded from."""
    scheme = archive.scheme
    roles = {*scheme.shared_roles, scheme.task_role(task)}
    return [part for part in entry.parts if part.role in roles]


class _Decoded:
    """A chunk's rows of one part's values, in order."""

    def __init__(self, archive: Archive, part: Part, entry: TensorEntry):
        self.rows = PartRows(part, entry, archive.stream, archive.raw, str(archive.path))
        self.spec = replace(part.spec, group_size=row_group_size(part.group_size, self.rows.cols))
        self.codes = np.empty(0, np.uint8)
        self.values = torch.empty(0)

    def next(self, rows: int) -> torch.Tensor:
        """The next `rows` rows' fp32 values ([rows, cols], in this decoder's buffer: valid
        until its next call)."""
        count = rows * self.rows.cols
        if self.codes.size < count:
            self.codes = np.empty(-(-count // 8) * 8, np.uint8)
            self.values = torch.empty(count)
        q = self.rows.next(rows, self.codes)
        out = self.values[:count]
        dequantize_into(q.codes.reshape(-1)[:count], self.spec, q.scales, q.zeros, out)
        return out.view(rows, self.rows.cols)


class _SchemeRows:
    """A task vector decoded from several parts a chunk at a time: its own part, and the parts
    every task of its archive shares (RTVQ's base), decoded once per chunk (`advance`)."""

    def __init__(self, ref, name: str, shared: dict[str, _Decoded]):
        archive, entry = ref.archive, ref.archive.entry(name)
        self.archive, self.task = archive, ref.task
        own = archive.scheme.task_role(ref.task)
        self.own = _Decoded(archive, next(p for p in entry.parts if p.role == own), entry)
        self.shared = shared  # role -> its decoder, shared by the archive's tasks
        self.values: dict[str, torch.Tensor] = {}  # the shared roles' values of this chunk

    def values_of(self, rows: int, out: torch.Tensor) -> None:
        """The task vector's next `rows` rows into `out` (flat fp32)."""
        own = self.own.next(rows)

        def dequantized(role: str) -> torch.Tensor:  # a scheme may change what it is given
            return own if role not in self.values else self.values[role].clone()

        out.copy_(self.archive.scheme.decode(self.task, dequantized, None).reshape(-1))


class TensorRows:
    """Every task's task vector of one tensor, decoded a chunk of rows at a time, in order,
    from its stored bytes: as one part's codes (`PartRows`) or, built from several parts, as
    fp32 values into the rows of `buffer`."""

    def __init__(self, sources: Sources, name: str, codes: CodeBuffers, buffer: TaskVectorBuffer):
        self.codes, self.buffer = codes, buffer
        self.parts: list[tuple[PartRows, QuantSpec] | _SchemeRows] = []
        shared: dict[int, dict[str, _Decoded]] = {}  # per archive: its shared roles' decoders
        for ref in sources.refs:
            archive = ref.archive
            sole = sole_part(archive, ref.task, name)
            if sole is not None:
                entry, part, spec = sole
                rows = PartRows(part, entry, archive.stream, archive.raw, str(archive.path))
                self.parts.append((rows, spec))
                continue
            entry = archive.entry(name)
            if id(archive) not in shared:
                roles = archive.scheme.shared_roles
                decoders = {p.role: p for p in entry.parts if p.role in roles}
                shared[id(archive)] = {r: _Decoded(archive, decoders[r], entry) for r in roles}
            self.parts.append(_SchemeRows(ref, name, shared[id(archive)]))
        self._shared = list(shared.values())

    def advance(self, rows: int) -> None:
        """Decode the next `rows` rows of every shared part (before the tasks' own)."""
        for decoders in self._shared:
            values = {role: decoder.next(rows) for role, decoder in decoders.items()}
            for task in self.parts:
                if isinstance(task, _SchemeRows) and task.shared is decoders:
                    task.values = values

    def task(self, index: int, rows: int) -> CodedVector | torch.Tensor:
        """Task `index`'s next `rows` rows: its codes in its code buffer, or its fp32 values in
        its row of the shared buffer (after `advance`)."""
        task = self.parts[index]
        if isinstance(task, _SchemeRows):
            row = self.buffer.rows(rows * task.own.rows.cols)[index]
            task.values_of(rows, row)
            return row
        part, spec = task
        q = part.next(rows, self.codes.codes(index, rows * part.cols))
        return CodedVector(q, spec)
