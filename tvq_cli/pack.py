"""`tvq pack`: task vectors from checkpoints, quantized and streamed into one archive.

Tensors are processed one at a time, in three overlapping stages (pipeline.py): a reader
thread reads the next tensor of every input while the current one is quantized in blocks of rows
on a thread pool (pack_tensor.py), and a writer thread checksums and writes the previous one.
Peak memory is bounded by (T + 3) times the largest tensor in fp32 plus a constant, whatever the
number of tensors (docs/performance.md has the measurements).
"""

from __future__ import annotations

import contextlib
import fnmatch
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .alloc import WEIGHTINGS, Allocation, allocate
from .archive.format import ITEMSIZE, ArchiveHeader, Part, TensorEntry, check_task_name, roles_for
from .archive.writer import ArchiveWriter, archive_size
from .checkpoint import FLOAT_DTYPES, Checkpoint, TensorSpec, combine_digests
from .errors import TvqError
from .output import check_target
from .pack_tensor import Settings, TensorPacker, task_mean
from .pipeline import Prefetcher, Writer, default_threads, fixed_mmap_threshold, torch_threads
from .quant import entropy
from .quant.entropy import CODECS
from .quant.quantizer import Quantized, QuantSpec, dequantize, quantize

DEFAULT_GROUP_SIZE = 128
DEFAULT_SCALE_BITS = 6
DEFAULT_RANGE = "search"
DEFAULT_CODEC = "zstd"
FINGERPRINT_PLACEHOLDER = "sha256:" + "0" * 64


@dataclass(frozen=True)
class PackOptions:
    """Quantization settings. Defaults: TVQ 4-bit, RTVQ base 3 / offset 2 bits, groups of 128
    with searched ranges, 6-bit compact scales and entropy-coded codes (docs/fidelity.md).

    `budget` (bits per weight, all bytes counted) lets the allocator choose bits per tensor
    and role instead of `bits` / `base_bits` / `offset_bits`.
    """

    scheme: str = "tvq"
    bits: int = 4
    base_bits: int = 3
    offset_bits: int = 2
    group_size: int = DEFAULT_GROUP_SIZE
    keep: tuple[str, ...] = ()
    error_correction: bool = True
    range: str = DEFAULT_RANGE
    scale_bits: int = DEFAULT_SCALE_BITS
    codec: str = DEFAULT_CODEC
    budget: float | None = None
    weighting: str = "params"
    budget_groups: tuple[int, ...] = ()  # group sizes the allocator may pick (default: group_size)

    def __post_init__(self) -> None:
        roles_for(self.scheme, ["x"])  # validates the scheme name
        for bits in (self.bits, self.base_bits, self.offset_bits):
            QuantSpec(bits, self.group_size, self.range, self.scale_bits)
        for group in self.budget_groups:
            QuantSpec(self.bits, group)
        if self.codec not in CODECS:
            raise TvqError(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.weighting not in WEIGHTINGS:
            raise TvqError(
                f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}"
            )
        if self.budget is not None and not self.budget > 0:
            raise TvqError(f"budget must be a positive number of bits per weight: {self.budget}")

    def parts(self, tasks: list[str]) -> list[Part]:
        roles = roles_for(self.scheme, tasks)
        if self.scheme == "rtvq":
            bits = [self.base_bits] + [self.offset_bits] * len(tasks)
        else:
            bits = [self.bits] * len(tasks)
        return [
            Part(role, b, self.group_size, self.range, self.scale_bits, self.codec)
            for role, b in zip(roles, bits, strict=True)
        ]


@dataclass
class PackResult:
    path: Path | None
    header: ArchiveHeader
    size_bytes: int
    seconds: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    allocation: Allocation | None = None


def default_task_name(path: Path) -> str:
    """A task's name from its path: the file stem, or the folder's name for model.safetensors."""
    path = Path(path)
    if path.is_file() and path.stem not in ("model", "pytorch_model"):
        return path.stem
    if path.is_file():
        return path.parent.resolve().name
    return path.resolve().name


def task_names(finetuned: list[Path], overrides: dict[str, str] | None = None) -> list[str]:
    """Names for the fine-tuned inputs; `overrides` maps a path (as given or resolved) to a name."""
    resolved = {str(Path(p).resolve()): n for p, n in (overrides or {}).items()}
    names = []
    for path in finetuned:
        name = resolved.get(str(Path(path).resolve())) or default_task_name(path)
        names.append(check_task_name(name))
    unknown = set(resolved) - {str(Path(p).resolve()) for p in finetuned}
    if unknown:
        raise TvqError(f"--name refers to {sorted(unknown)[0]}, which is not a fine-tuned input")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise TvqError(f"duplicate task name {name!r}: give distinct names with --name")
        seen.add(name)
    return names


def check_compatible(pretrained: Checkpoint, finetuned: list[Checkpoint]) -> None:
    """Same keys, shapes and dtypes everywhere; float tensors in fp32, fp16 or bf16."""
    for name, spec in pretrained.specs.items():
        if spec.is_float and spec.dtype not in FLOAT_DTYPES:
            raise TvqError(
                f"{pretrained.path}: tensor {name} has dtype {spec.dtype}; "
                "float tensors must be F32, F16 or BF16"
            )
    for ckpt in finetuned:
        for name, spec in pretrained.specs.items():
            other = ckpt.specs.get(name)
            if other is None:
                raise TvqError(f"{ckpt.path}: tensor {name} is missing (present in pretrained)")
            if other.shape != spec.shape:
                raise TvqError(
                    f"{ckpt.path}: tensor {name} has shape {list(other.shape)}, "
                    f"pretrained has {list(spec.shape)}"
                )
            if other.dtype != spec.dtype:
                raise TvqError(
                    f"{ckpt.path}: tensor {name} has dtype {other.dtype}, "
                    f"pretrained has {spec.dtype}"
                )
        extra = [n for n in ckpt.specs if n not in pretrained.specs]
        if extra:
            raise TvqError(f"{ckpt.path}: tensor {extra[0]} is not in the pretrained checkpoint")


def plan_pack(
    pretrained: Checkpoint, finetuned: list[Checkpoint], tasks: list[str], options: PackOptions
) -> ArchiveHeader:
    """The archive header: which tensors are quantized, kept exact or shared, and how."""
    if not finetuned:
        raise TvqError("give at least one fine-tuned checkpoint")
    if len(tasks) != len(finetuned):
        raise TvqError("internal error: one task name per fine-tuned checkpoint")
    check_compatible(pretrained, finetuned)
    return ArchiveHeader(
        scheme=options.scheme,
        tasks=list(tasks),
        tool_version=__version__,
        pretrained_fingerprint=FINGERPRINT_PLACEHOLDER,
        tensors=plan_tensors(pretrained.specs, options.parts(tasks), options.keep),
        error_correction=options.error_correction if options.scheme == "rtvq" else None,
    )


def plan_tensors(
    specs: dict[str, TensorSpec], parts: list[Part], keep: tuple[str, ...] = ()
) -> list[TensorEntry]:
    """How each tensor is stored: non-float shared, 1-D or `keep` exact, the rest quantized."""
    entries = []
    for name, spec in specs.items():
        if not spec.is_float:
            kind = "shared"
        elif len(spec.shape) < 2 or any(fnmatch.fnmatchcase(name, g) for g in keep):
            kind = "exact"
        else:
            kind = "quantized"
        entries.append(
            TensorEntry(name, spec.shape, spec.dtype, kind, parts if kind == "quantized" else [])
        )
    return entries


def _write_all(writer: ArchiveWriter, outputs: list) -> None:
    for key, data in outputs:
        writer.write(key, data)


def resolve_device(device: str) -> torch.device:
    """The torch device for quantization; a clear error when it is not usable here."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TvqError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        return torch.device(device)
    raise TvqError(f"--device must be cpu or cuda, got {device!r}")


def check_threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if threads < 1:
        raise TvqError(f"--threads must be at least 1, got {threads}")
    return threads


def quantized_parts(
    entry: TensorEntry, pre: torch.Tensor, finetuned: list[Checkpoint], options: PackOptions
) -> Iterator[tuple[Part, Quantized]]:
    """Quantize one tensor's roles in storage order (the pretrained value given in fp32)."""
    name, parts = entry.name, entry.parts
    if options.scheme == "tvq":
        for part, ckpt in zip(parts, finetuned, strict=True):
            yield part, quantize(ckpt.load_float(name) - pre, part.spec)
    elif options.scheme == "fq":
        for part, ckpt in zip(parts, finetuned, strict=True):
            yield part, quantize(ckpt.load_float(name), part.spec)
    else:
        # not in place: a loaded tensor may share memory with the checkpoint's open handle
        deltas = [ckpt.load_float(name) - pre for ckpt in finetuned]
        base = task_mean(deltas)
        base_q = quantize(base, parts[0].spec)
        yield parts[0], base_q
        anchor = (
            dequantize(base_q, parts[0].spec, entry.shape) if options.error_correction else base
        )
        for part, delta in zip(parts[1:], deltas, strict=True):
            yield part, quantize(delta.sub_(anchor), part.spec)  # delta is our own copy


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
    for entry in header.tensors:
        if entry.kind != "quantized" or all(p.codec != "zstd" for p in entry.parts):
            continue
        sized = []
        for part, q in quantized_parts(entry, pre.load_float(entry.name), fts, options):
            if part.codec == "zstd":
                frame = entropy.encode(q.codes.numpy(), part.bits)
                part = replace(part, coded_nbytes=len(frame))
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
    settings = Settings(
        options.scheme,
        options.error_correction,
        tasks,
        pre.path,
        [c.path for c in fts],
        torch_device,
    )
    largest = max(t.numel * ITEMSIZE[t.dtype] for t in header.tensors)
    digests: dict[str, bytes] = {}
    fixed_mmap_threshold()
    with ArchiveWriter(out, header) as writer, torch_threads(1), contextlib.ExitStack() as stack:
        packer = TensorPacker(settings, threads)
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
    stats = {
        kind: sum(1 for t in header.tensors if t.kind == kind)
        for kind in ("quantized", "exact", "shared")
    }
    size = out.stat().st_size
    if allocation is not None and size > allocation.budget_bytes:
        raise TvqError(f"internal error: {out} is {size} bytes, over the budget")
    return PackResult(out, header, size, time.perf_counter() - start, stats, allocation)
