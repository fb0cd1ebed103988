"""Writing merged models: a .safetensors file, a folder, or one model per task.

Tensors are merged and written in file order: the next pretrained tensor is read (and hashed
for the pretrained fingerprint, checked before the output is finished) while the current one is
merged, and the previous one is written meanwhile; the output appears under its name only when
complete (`io.atomic`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..concurrency import Writer
from ..dtypes import OUTPUT_DTYPES, itemsize, to_torch
from ..errors import TvqError
from ..io.atomic import atomic_output
from ..io.checkpoint import TensorSpec, combine_digests, tensor_digest
from ..io.model_writer import ModelWriter, SafetensorsStream
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
    """Merge and write the tensors `names` in order, reading ahead and writing behind;
    returns the digests of the pretrained tensors read (for its fingerprint)."""
    pre = merge.pretrained
    float_names = set(merge.float_names)
    bar = engine.bar("merge")
    blocked = merge.method.elementwise and not merge.method.per_task
    largest = max((specs[n].nbytes for n in names if n in float_names), default=1)
    outs = [torch.empty(largest, dtype=torch.uint8) for _ in range(2 if blocked else 0)]
    reader = ThreadPoolExecutor(1, thread_name_prefix="tvq-read")
    writer = Writer()
    digests: dict[str, bytes] = {}
    # three rotating read buffers: one being read, one being merged, one the writer may
    # still be writing (a non-float tensor is written as read)
    largest_raw = max((pre.specs[n].nbytes for n in names), default=0)
    reads = [torch.empty(largest_raw, dtype=torch.uint8) for _ in range(3)]

    def load(i: int) -> torch.Tensor:  # read and fingerprinted in the reader thread
        raw = pre.load(names[i], reads[i % 3])
        digests[names[i]] = tensor_digest(names[i], raw)
        return raw

    try:
        pending = reader.submit(load, 0) if names else None
        for i, name in enumerate(names):
            raw = pending.result()
            if i + 1 < len(names):
                pending = reader.submit(load, i + 1)
            dtype = to_torch(specs[name].dtype)
            if name not in float_names:
                outputs = [raw] * len(writers)
            else:
                bar.update()
                if blocked:
                    out = outs[i % 2][: raw.numel() * itemsize(specs[name].dtype)]
                    outputs = [engine.merge_blocks(name, raw, out.view(dtype))]
                else:
                    outputs = engine.merge_whole(name, raw, dtype)
            writer.submit(
                lambda name=name, outputs=outputs: [
                    w.write(name, t) for w, t in zip(writers, outputs, strict=True)
                ]
            )
        writer.wait()
    finally:
        bar.close()
        writer.close()
        reader.shutdown(wait=True, cancel_futures=True)
    return digests
