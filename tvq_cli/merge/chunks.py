"""Large tensors merged a block of rows at a time: a merge's peak memory flat in the number of
tasks and in the size of the largest tensor.

Why: the whole-tensor way holds every task's codes of the tensor (a byte per value,
`stream.CodeBuffers`) and their stored bytes, the pretrained tensor (three rotating read
buffers) and the merged one (two output buffers): for Llama-3's 128256 x 4096 embedding that is
0.5 GB per task, and 4.4 GB at T = 2 already. A float tensor whose whole way would take more
than WHOLE_LIMIT is taken in chunks of whole rows, in order, where the method is elementwise
(its statistics passes too) and every task's task vector of it is one part of whole groups per
row (TVQ, `stream.sole_part`): each task's codes of a chunk come from its stored bytes read in
pieces (`archive.parts.PartRows`: its zstd frame streamed, bit-packed bytes by range), the
chunk's pretrained rows are read on their own (`Checkpoint.load_rows`) and fingerprinted in
order, merged with the same arithmetic, and written in order (`ModelWriter.write_rows`). The
bytes are those of the whole tensor: the methods are elementwise, and a chunk starts on a group
boundary (groups never cross rows). Everything else keeps the whole-tensor way.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..archive.parts import PartRows
from ..io.checkpoint import TensorSpec
from ..quant.spec import QuantSpec
from .sources import Sources
from .stream import CodeBuffers, CodedVector, sole_part

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
    tasks = len(sources.tasks)
    if not elementwise or len(spec.shape) != 2:
        return [Piece(name)]
    rows, cols = spec.shape
    # per row: every task's codes, three read buffers of its pretrained values, two of output
    row_cost = tasks * cols + 3 * spec.nbytes // rows + 2 * cols * out_itemsize
    if rows * row_cost <= WHOLE_LIMIT:
        return [Piece(name)]
    if any(sole_part(r.archive, r.task, name) is None for r in sources.refs):
        return [Piece(name)]
    step = max(ROW_MULTIPLE, CHUNK_BYTES // row_cost // ROW_MULTIPLE * ROW_MULTIPLE)
    return [
        Piece(name, range(first, min(first + step, rows)), last=first + step >= rows)
        for first in range(0, rows, step)
    ]


class TensorRows:
    """Every task's task vector of one tensor, decoded a chunk of rows at a time, in order,
    from its stored bytes (one `PartRows` per task)."""

    def __init__(self, sources: Sources, name: str, codes: CodeBuffers):
        self.codes = codes
        self.parts: list[tuple[PartRows, QuantSpec]] = []
        for ref in sources.refs:
            archive = ref.archive
            entry, part, spec = sole_part(archive, ref.task, name)
            rows = PartRows(part, entry, archive.stream, archive.raw, str(archive.path))
            self.parts.append((rows, spec))

    def task(self, index: int, rows: int) -> CodedVector:
        """Task `index`'s codes of its next `rows` rows, in its code buffer."""
        part, spec = self.parts[index]
        q = part.next(rows, self.codes.codes(index, rows * part.cols))
        return CodedVector(q, spec)
