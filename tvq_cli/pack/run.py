"""`tvq pack`: task vectors from checkpoints, quantized and streamed into one archive.

Tensors are processed one at a time, in three overlapping stages: a reader thread reads the
next tensor of every input (`prefetch.py`) while the current one is quantized in blocks of rows
on a thread pool (`packer.py`), and a writer thread checksums and writes the previous one.
A tensor too large to hold once per input is read and coded by blocks of rows, one role at a
time (`rows.py`), so peak memory stays within a bound set by `rows.ROWS_ABOVE`, whatever the
number of tasks or tensors (docs/performance.md has the measurements).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..archive.format import ArchiveHeader, TensorEntry, file_key
from ..archive.parts import stored_codes
from ..archive.reader import Archive
from ..archive.writer import ArchiveWriter, archive_size
from ..concurrency import (
    Writer,
    check_threads,
    collector_paused,
    fixed_mmap_threshold,
    torch_threads,
)
from ..dtypes import itemsize
from ..errors import InternalError, TvqError, UsageError, usage_errors, warn
from ..io.checkpoint import Checkpoint, combine_digests
from ..io.compat import check_pretrained
from ..io.model_writer import parse_size
from ..io.target import check_target, claim_output
from ..io.task_source import TaskSource
from ..io.tasks import open_tasks
from ..quant import sizes
from .alloc import Allocation, allocate
from .blocked import Output, StoredBytes
from .frames import Frames
from .options import PackOptions
from .packer import TensorPacker, added_rows
from .plan import PackPlan, plan_archive, task_names
from .prefetch import Prefetcher, TensorInputs
from .rows import RowsRoute, by_rows
from .values import TaskValues
from .whole import encode_whole


@dataclass
class PackResult:
    path: Path | None
    header: ArchiveHeader
    size_bytes: int
    seconds: float = 0.0
    allocation: Allocation | None = None
    notes: list[str] = field(default_factory=list)  # names mapped, files left out, ...

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
    raise UsageError(f"--device must be cpu or cuda, got {device!r}")


def open_inputs(pretrained: Path, finetuned: list[Path]) -> tuple[Checkpoint, list[TaskSource]]:
    """The pretrained checkpoint and every fine-tune, matched onto its names."""
    pre = Checkpoint(pretrained)
    check_pretrained(pre)
    return pre, open_tasks(finetuned, pre)


def _close(pre: Checkpoint, fts: list[TaskSource]) -> None:
    for source in fts:
        source.close()
    pre.close()


def dry_run(
    pretrained: Path | str,
    finetuned: list[Path | str],
    options: PackOptions | None = None,
    names: dict[str, str] | None = None,
    progress: bool = False,
) -> PackResult:
    """The exact archive size for these inputs and settings.

    Reads no weight unless the size depends on them: entropy-coded codes are measured, and
    with a budget the allocation is computed (and reported in `allocation`).
    """
    options = options or PackOptions()
    finetuned = [Path(p) for p in finetuned]
    tasks, notes = task_names(finetuned, names)
    pre, fts = open_inputs(Path(pretrained), finetuned)
    try:
        plan = plan_archive(pre, fts, tasks, options)
        header = plan.header
        allocation = _allocate(header, pre, fts, options, progress)
        _measure_coded(header, pre, fts, options, low_rate_only=allocation is not None)
    finally:
        _close(pre, fts)
    size = archive_size(header)
    return PackResult(None, header, size, allocation=allocation, notes=notes + plan.notes)


def _allocate(
    header: ArchiveHeader,
    pre: Checkpoint,
    fts: list[TaskSource],
    options: PackOptions,
    progress: bool = False,
) -> Allocation | None:
    if options.budget is None:
        return None
    return allocate(
        header, pre, fts, options.budget, options.weighting, options.budget_groups, progress
    )


def _measure_coded(
    header: ArchiveHeader,
    pre: Checkpoint,
    fts: list[TaskSource],
    options: PackOptions,
    low_rate_only: bool = False,
) -> None:
    """Fill in the coded size of every entropy-coded part (only of the low-rate ones: the
    allocator measured the others exactly) and of every frame, by coding them."""
    rules = options.rules
    cpu = torch.device("cpu")
    frames = dict.fromkeys(header.frames, 0)

    def measured(part) -> bool:
        return not part.dense or (part.codec in sizes.CODED and not low_rate_only)

    for entry in header.tensors:
        if entry.kind != "quantized" or not any(measured(p) for p in entry.parts):
            continue
        pre_t = pre.load_float(entry.name) if rules.subtracts_pretrained else None
        sources = [(c.path, lambda c=c, n=entry.name: c.load(n)) for c in fts]
        values = TaskValues(entry.name, sources, pre_t, cpu)
        sized = []
        for part, coded in encode_whole(entry, rules, values, options.error_correction):
            if not part.dense and entry.framed:
                frames[part.role] += len(coded.record)
            elif not part.dense:
                part = replace(part, coded_nbytes=len(coded.record))
            elif measured(part):
                part = replace(part, coded_nbytes=len(stored_codes(part, entry.shape, coded)))
            sized.append(part)
        entry.parts = sized
    header.frames = frames


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
    max_shard_size: int | str | None = None,
    ray: str | None = None,
) -> PackResult:
    """Pack fine-tuned checkpoints of one pretrained model into an archive at `out`.

    Fine-tunes are model checkpoints or PEFT LoRA adapter folders (docs/cli.md, "Inputs").
    `threads`: worker threads (default: every core this process may use); `device`: where
    quantization runs ("cpu", or "cuda" when a GPU is present); `max_shard_size` (e.g. "5GB"):
    write a sharded archive, the folder `out` (docs/format.md); `ray` ("local" or a Ray
    cluster's address): write its shards in Ray tasks, `threads` cores each (default 1), the
    same bytes (`distributed.py`).
    """
    options = options or PackOptions()
    torch_device = resolve_device(device)
    threads = check_threads(1 if ray is not None and threads is None else threads)
    with usage_errors():
        max_shard = None if max_shard_size is None else parse_size(max_shard_size)
    if ray is not None and max_shard is None:
        raise UsageError("--ray writes a sharded archive: give --max-shard-size too")
    out = Path(out)
    finetuned = [Path(p) for p in finetuned]
    tasks, notes = task_names(finetuned, names)
    folder = max_shard is not None
    pre, fts = open_inputs(Path(pretrained), finetuned)
    try:
        inputs = [f for c in [pre, *fts] for f in c.files]
        check_target(out, overwrite, inputs, folder)
        start = time.perf_counter()
        plan = plan_archive(pre, fts, tasks, options)
        allocation = _allocate(plan.header, pre, fts, options, progress)
        with claim_output(out, overwrite, inputs, folder):
            if ray is None:
                unchanged = write_archive(
                    plan,
                    pre,
                    fts,
                    out,
                    options,
                    torch_device,
                    threads,
                    progress,
                    max_shard,
                    overwrite,
                )
            else:
                if plan.header.frames:
                    raise UsageError(
                        "--ray cannot write this archive yet: its small tensors' low-rate "
                        "records share one frame per role, across shards (pack it without --ray)"
                    )
                from .distributed import write_archive_on_ray  # Ray only when asked for

                unchanged = write_archive_on_ray(
                    ray, plan, pre, fts, out, options, device, threads, max_shard, overwrite
                )
    finally:
        _close(pre, fts)
    for index in unchanged:
        warn(
            f"task {tasks[index]!r}: {fts[index].path} is identical to the pretrained "
            "checkpoint, so its task vector is all zero (was the pretrained packed as a task?)"
        )
    size = archive_bytes(out)
    if allocation is not None and size > allocation.budget_bytes:
        raise InternalError(f"{out} is {size} bytes, over the budget")
    seconds = time.perf_counter() - start
    return PackResult(out, plan.header, size, seconds, allocation, notes + plan.notes)


def write_archive(
    plan: PackPlan,
    pre: Checkpoint,
    fts: list[TaskSource],
    out: Path,
    options: PackOptions,
    device: torch.device,
    threads: int,
    progress: bool,
    max_shard: int | None,
    replace: bool,
) -> list[int]:
    """Read, quantize and write every tensor of a planned archive, then its small files; the
    pretrained and task fingerprints are taken from the bytes as they are read. Returns the
    tasks whose task vector is all zero."""
    header = plan.header
    with ArchiveWriter(out, header, max_shard, replace) as writer:
        digests, unchanged = code_tensors(
            header, header.tensors, pre, fts, options, device, threads, progress, writer.write
        )
        for sha in sorted(header.files):
            writer.write(file_key(sha), plan.files.frames[sha])
        header.pretrained_fingerprint = combine_digests(digests)
        for task, source in zip(header.tasks, fts, strict=True):
            header.task_info[task].fingerprint = source.fingerprint()
    return unchanged


def code_tensors(
    header: ArchiveHeader,
    entries: list[TensorEntry],
    pre: Checkpoint,
    fts: list[TaskSource],
    options: PackOptions,
    device: torch.device,
    threads: int,
    progress: bool,
    write: Callable[[str, StoredBytes], None],
) -> tuple[dict[str, bytes], list[int]]:
    """Read and quantize the tensors `entries` of `header`, handing their stored tensors in
    order to `write` on a background thread, then the frames of their small low-rate records
    (`pack.frames`; a run over some of the entries only is refused where the header has frames).
    Returns the pretrained tensors' digests and the tasks whose task vector is all zero in
    every one of them."""
    scheme = options.rules
    by_rows_names = frozenset(
        e.name
        for e in entries
        if device.type == "cpu" and by_rows(e, scheme, options.error_correction, fts)
    )
    held = [e for e in entries if e.name not in by_rows_names]
    largest = max((t.numel * itemsize(t.dtype) for t in held), default=1)
    digests: dict[str, bytes] = {}
    fixed_mmap_threshold()
    with torch_threads(1), collector_paused(), contextlib.ExitStack() as stack:
        packer = TensorPacker(
            options.rules,
            options.error_correction,
            header.tasks,
            pre.path,
            [c.path for c in fts],
            device,
            threads,
        )
        stack.callback(packer.close)
        background = Writer()
        stack.callback(background.close)
        rows = RowsRoute(scheme, options.error_correction, header, pre, fts, threads)
        stack.callback(rows.close)
        reader = Prefetcher(entries, pre, fts, largest * (1 + len(fts)), by_rows_names)
        stack.callback(reader.close)
        reader.start()
        bar = tqdm(
            reader,
            total=len(entries),
            desc="pack",
            unit="tensor",
            disable=not progress,
            file=sys.stderr,
        )
        unchanged = UnchangedTasks(len(fts))
        frames = Frames(header)

        def emit(outputs: list[Output]) -> None:
            background.submit(lambda: [write(k, data) for k, data in outputs])

        for inputs in bar:
            if inputs.entry.name in by_rows_names:
                reader.release(inputs)
                result = rows.pack(inputs.entry, emit, bar.set_postfix_str)
                bar.set_postfix_str("")
                digests[inputs.entry.name] = result.digest
                unchanged.keep(result.unchanged)
                continue
            digests[inputs.entry.name] = inputs.digest
            unchanged.see(inputs)
            outputs = frames.split(packer.outputs(inputs)) + added_rows(
                header, header.tasks, inputs
            )
            reader.release(inputs)
            emit(outputs)
        background.wait()
        for key, data in frames.stored():
            write(key, data)
    return digests, unchanged.tasks


def archive_bytes(path: Path) -> int:
    """Bytes of an archive on disk, every file of a sharded one included."""
    archive = Archive(path)
    archive.close()
    return archive.file_size


class UnchangedTasks:
    """The fine-tunes that have not differed from the pretrained checkpoint in any float
    tensor so far. A real fine-tune differs in its first tensor or so, so this costs about
    one comparison of one tensor per task."""

    def __init__(self, count: int):
        self.tasks = list(range(count))

    def keep(self, tasks: set[int]) -> None:
        """Of the tasks so far unchanged, keep those in `tasks`."""
        self.tasks = [t for t in self.tasks if t in tasks]

    def see(self, inputs: TensorInputs) -> None:
        if inputs.entry.kind == "shared":  # non-float tensors equal the pretrained ones anyway
            return
        pre = inputs.pretrained
        self.tasks = [
            t
            for t in self.tasks
            if inputs.finetuned[t].dtype == pre.dtype and torch.equal(inputs.finetuned[t], pre)
        ]
