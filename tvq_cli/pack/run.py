"""`tvq pack`: task vectors from checkpoints, quantized and streamed into one archive.

Tensors are processed one at a time, in three overlapping stages: a reader thread reads the
next tensor of every input (`prefetch.py`) while the current one is quantized in blocks of rows
on a thread pool (`packer.py`), and a writer thread checksums and writes the previous one.
Peak memory is bounded by (T + 3) times the largest tensor in fp32 plus a constant, whatever the
number of tensors (docs/performance.md has the measurements).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..archive.format import ArchiveHeader
from ..archive.writer import ArchiveWriter, archive_size
from ..concurrency import (
    Writer,
    check_threads,
    collector_paused,
    fixed_mmap_threshold,
    torch_threads,
)
from ..dtypes import itemsize
from ..errors import InternalError, TvqError
from ..io.atomic import check_target
from ..io.checkpoint import Checkpoint, combine_digests
from ..quant import entropy
from .alloc import Allocation, allocate
from .options import PackOptions
from .packer import TensorPacker
from .plan import plan_pack, task_names
from .prefetch import Prefetcher
from .values import TaskValues
from .whole import encode_whole


@dataclass
class PackResult:
    path: Path | None
    header: ArchiveHeader
    size_bytes: int
    seconds: float = 0.0
    allocation: Allocation | None = None

    @property
    def bits_per_weight(self) -> float:
        return self.header.bits_per_weight(self.size_bytes)

    @property
    def ratio_vs_fp32(self) -> float:
        return self.header.ratio_vs_fp32(self.size_bytes)


def resolve_device(device: str) -> torch.device:
    """The torch device for quantization; a clear error when it is not usable here."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TvqError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        return torch.device(device)
    raise TvqError(f"--device must be cpu or cuda, got {device!r}")


def _open_inputs(pretrained: Path, finetuned: list[Path]) -> tuple[Checkpoint, list[Checkpoint]]:
    return Checkpoint(pretrained), [Checkpoint(p) for p in finetuned]


def dry_run(
    pretrained: Path | str,
    finetuned: list[Path | str],
    options: PackOptions | None = None,
    names: dict[str, str] | None = None,
) -> PackResult:
    """The exact archive size for these inputs and settings.

    Reads no weight unless the size depends on them: entropy-coded codes are measured, and
    with a budget the allocation is computed (and reported in `allocation`).
    """
    options = options or PackOptions()
    finetuned = [Path(p) for p in finetuned]
    tasks = task_names(finetuned, names)
    pre, fts = _open_inputs(Path(pretrained), finetuned)
    header = plan_pack(pre, fts, tasks, options)
    allocation = _allocate(header, pre, fts, options)
    if allocation is None:
        _measure_coded(header, pre, fts, options)
    return PackResult(None, header, archive_size(header), allocation=allocation)


def _allocate(
    header: ArchiveHeader, pre: Checkpoint, fts: list[Checkpoint], options: PackOptions
) -> Allocation | None:
    if options.budget is None:
        return None
    return allocate(header, pre, fts, options.budget, options.weighting, options.budget_groups)


def _measure_coded(
    header: ArchiveHeader, pre: Checkpoint, fts: list[Checkpoint], options: PackOptions
) -> None:
    """Fill in the coded size of every entropy-coded part by quantizing and coding it."""
    rules = options.rules
    cpu = torch.device("cpu")
    for entry in header.tensors:
        if entry.kind != "quantized" or all(p.codec != "zstd" for p in entry.parts):
            continue
        pre_t = pre.load_float(entry.name) if rules.subtracts_pretrained else None
        sources = [(c.path, lambda c=c, n=entry.name: c.load(n)) for c in fts]
        values = TaskValues(entry.name, sources, pre_t, cpu)
        sized = []
        for part, q in encode_whole(entry, rules, values, options.error_correction):
            if part.codec == "zstd":
                part = replace(part, coded_nbytes=len(entropy.encode(q.codes.numpy(), part.bits)))
            sized.append(part)
        entry.parts = sized


def pack(
    pretrained: Path | str,
    finetuned: list[Path | str],
    out: Path | str,
    options: PackOptions | None = None,
    names: dict[str, str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    threads: int | None = None,
    device: str = "cpu",
) -> PackResult:
    """Pack fine-tuned checkpoints of one pretrained model into an archive at `out`.

    `threads`: worker threads (default: every core this process may use); `device`: where
    quantization runs ("cpu", or "cuda" when a GPU is present).
    """
    options = options or PackOptions()
    torch_device = resolve_device(device)
    threads = check_threads(threads)
    out = Path(out)
    finetuned = [Path(p) for p in finetuned]
    tasks = task_names(finetuned, names)
    pre, fts = _open_inputs(Path(pretrained), finetuned)
    if out.is_dir():
        raise TvqError(f"{out}: is a folder; give an archive file name such as tasks.tvq")
    check_target(out, overwrite, [f for c in [pre, *fts] for f in c.files])
    start = time.perf_counter()
    header = plan_pack(pre, fts, tasks, options)
    allocation = _allocate(header, pre, fts, options)
    largest = max(t.numel * itemsize(t.dtype) for t in header.tensors)
    digests: dict[str, bytes] = {}
    fixed_mmap_threshold()
    with (
        ArchiveWriter(out, header) as writer,
        torch_threads(1),
        collector_paused(),
        contextlib.ExitStack() as stack,
    ):
        packer = TensorPacker(
            options.rules,
            options.error_correction,
            tasks,
            pre.path,
            [c.path for c in fts],
            torch_device,
            threads,
        )
        stack.callback(packer.close)
        background = Writer()
        stack.callback(background.close)
        reader = Prefetcher(header.tensors, pre, fts, budget=largest * (1 + len(fts)))
        stack.callback(reader.close)
        reader.start()
        bar = tqdm(
            reader,
            total=len(header.tensors),
            desc="pack",
            unit="tensor",
            disable=not progress,
            file=sys.stderr,
        )
        for inputs in bar:
            digests[inputs.entry.name] = inputs.digest
            outputs = packer.outputs(inputs)
            reader.release(inputs)
            background.submit(lambda outputs=outputs: _write_all(writer, outputs))
        background.wait()
        header.pretrained_fingerprint = combine_digests(digests)
    for ckpt in (pre, *fts):
        ckpt.close()
    size = out.stat().st_size
    if allocation is not None and size > allocation.budget_bytes:
        raise InternalError(f"{out} is {size} bytes, over the budget")
    return PackResult(out, header, size, time.perf_counter() - start, allocation)


def _write_all(writer: ArchiveWriter, outputs: list) -> None:
    for key, data in outputs:
        writer.write(key, data)
