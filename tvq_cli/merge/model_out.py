"""Writing merged models: a .safetensors file, a folder, or one model per task.

Tensors are merged and written in file order, a large one a chunk of rows at a time
(`chunks`): the next pretrained tensor or chunk is read (and hashed for the pretrained
fingerprint, checked before the output is finished) while the current one is merged, and the
previous one is written meanwhile; the output appears under its name only when complete
(`io.atomic`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..concurrency import Writer
from ..dtypes import OUTPUT_DTYPES, itemsize, to_torch
from ..errors import TvqError
from ..io.atomic import atomic_output
from ..io.checkpoint import TensorSpec, combine_digests, digest_start, tensor_digest
from ..io.model_writer import ModelWriter, SafetensorsStream
from ..tensors import tensor_bytes
from .chunks import Piece
from .engine import Engine
from .request import Merge


def output_specs(merge: Merge) -> dict[str, TensorSpec]:
    """Every output tensor's shape and dtype: the pretrained model's, floats in `--dtype`."""
    dtype = merge.request.dtype
    specs = {}
    for name, spec in merge.pretrained.specs.items():
        if spec.is_float and dtype is not None:
            spec = TensorSpec(spec.shape, OUTPUT_DTYPES[dtype])
        specs[name] = spec
    return specs


# merges and writes every tensor through the writers; returns the pretrained tensors' digests
Streamer = Callable[[Merge, Engine, list[ModelWriter], dict[str, TensorSpec]], dict[str, bytes]]


def write_models(merge: Merge, engine: Engine, stream: Streamer | None = None) -> dict:
    """Write one model (or one per target task) and describe what was written. `stream`: who
    merges and writes the tensors (default: this process, `stream_all`)."""
    specs = output_specs(merge)
    out, pre = merge.out, merge.pretrained
    pre_is_folder = pre.path.is_dir()
    per_task = merge.method.per_task and merge.request.all_tasks
    folder = merge.request.folder_output
    with atomic_output(out, folder=folder, replace=merge.request.force) as staged:
        if per_task:
            staged.mkdir()
            paths = [
                staged / (t if pre_is_folder else f"{t}.safetensors") for t in merge.target_names
            ]
            as_folder = pre_is_folder
        else:
            paths, as_folder = [staged], folder
        dtype = OUTPUT_DTYPES[merge.request.dtype] if merge.request.dtype else None
        writers: list[ModelWriter] = []
        try:
            for p in paths:
                copy_from = pre.path if pre_is_folder and as_folder else None
                writers.append(
                    ModelWriter(
                        p,
                        specs,
                        folder=as_folder,
                        max_shard_bytes=merge.max_shard,
                        copy_from=copy_from,
                        dtype=dtype,
                    )
                )
            digests = (stream or stream_all)(merge, engine, writers, specs)
            merge.sources.check_fingerprint(combine_digests(digests))
            for writer in writers:
                writer.finish()
        except BaseException as exc:
            for writer in writers:
                writer.abort()
            if isinstance(exc, OSError):  # e.g. a full disk: say which output
                raise TvqError(f"cannot write {out}: {exc.strerror or exc}") from None
            raise
    files = [out / f.relative_to(staged) for w in writers for f in w.files]
    return {
        "path": str(out),
        "format": "folder" if folder else "safetensors",
        "files": [str(f) for f in files],
        "bytes": sum(f.stat().st_size for f in files),
        "dtype": merge.request.dtype or "as pretrained",
        "targets": merge.target_names if merge.method.per_task else None,
    }


def stream_all(
    merge: Merge, engine: Engine, writers: list[ModelWriter], specs: dict[str, TensorSpec]
) -> dict[str, bytes]:
    """Every tensor merged here and written in file order."""
    return stream_tensors(merge, engine, writers, specs, merge.pretrained.names)


def stream_tensors(
    merge: Merge,
    engine: Engine,
    writers: list[ModelWriter | SafetensorsStream],
    specs: dict[str, TensorSpec],
    names: list[str],
) -> dict[str, bytes]:
    """Merge and write the tensors `names` in order, piece by piece (a large tensor a chunk of
    rows at a time: `chunks`), reading ahead and writing behind; returns the digests of the
    pretrained tensors read (for its fingerprint)."""
    pre = merge.pretrained
    float_names = set(merge.float_names)
    bar = engine.bar("merge")
    blocked = merge.method.elementwise and not merge.method.per_task
    pieces = [
        piece
        for name in names
        for piece in (engine.pieces(name) if blocked and name in float_names else [Piece(name)])
    ]
    largest = max((_nbytes(specs[p.name], p) for p in pieces if p.name in float_names), default=1)
    outs = [torch.empty(largest, dtype=torch.uint8) for _ in range(2 if blocked else 0)]
    reader = ThreadPoolExecutor(1, thread_name_prefix="tvq-read")
    writer = Writer()
    digests: dict[str, bytes] = {}
    hashes: dict[str, hashlib._Hash] = {}  # of tensors read a chunk at a time
    # three rotating read buffers: one being read, one being merged, one the writer may
    # still be writing (a non-float tensor is written as read)
    largest_raw = max((_nbytes(pre.specs[p.name], p) for p in pieces), default=0)
    reads = [torch.empty(largest_raw, dtype=torch.uint8) for _ in range(3)]

    def load(i: int) -> torch.Tensor:  # read and fingerprinted in the reader thread
        piece = pieces[i]
        name, rows = piece.name, piece.rows
        if rows is None:
            raw = pre.load(name, reads[i % 3])
            digests[name] = tensor_digest(name, raw)
            return raw
        raw = pre.load_rows(name, rows.start, rows.stop, reads[i % 3])
        if rows.start == 0:
            hashes[name] = digest_start(name, pre.specs[name].dtype, pre.specs[name].shape)
        hashes[name].update(tensor_bytes(raw))
        if piece.last:
            digests[name] = hashes.pop(name).digest()
        return raw

    try:
        pending = reader.submit(load, 0) if pieces else None
        for i, piece in enumerate(pieces):
            raw = pending.result()
            if i + 1 < len(pieces):
                pending = reader.submit(load, i + 1)
            name = piece.name
            dtype = to_torch(specs[name].dtype)
            if name not in float_names:
                outputs = [raw] * len(writers)
            else:
                if piece.last:
                    bar.update()
                if blocked:
                    out = outs[i % 2][: raw.numel() * itemsize(specs[name].dtype)]
                    outputs = [engine.merge_blocks(piece, raw, out.view(dtype))]
                else:
                    outputs = engine.merge_whole(name, raw, dtype)
            writer.submit(lambda piece=piece, outputs=outputs: _write(writers, piece, outputs))
        writer.wait()
    finally:
        bar.close()
        writer.close()
        reader.shutdown(wait=True, cancel_futures=True)
    return digests


def _nbytes(spec: TensorSpec, piece: Piece) -> int:
    """Bytes of a piece of a tensor of `spec`."""
    if piece.rows is None:
        return spec.nbytes
    return spec.nbytes // spec.shape[0] * len(piece.rows)


def _write(writers: list, piece: Piece, outputs: list[torch.Tensor]) -> None:
    for w, tensor in zip(writers, outputs, strict=True):
        if piece.rows is None:
            w.write(piece.name, tensor)
        else:
            w.write_rows(piece.name, tensor)
