"""`tvq pack`: quantize the task vectors of fine-tuned checkpoints into one archive."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..errors import UsageError
from ..quant.sizes import DEFAULT_CODEC
from ..quant.spec import DEFAULT_GROUP_SIZE, DEFAULT_RANGE, DEFAULT_SCALE_BITS
from ..report import quantization_settings
from ..report.render import human_bytes
from .common import app, print_notes, show_progress, stderr, stdout

if TYPE_CHECKING:
    from ..pack import PackResult


def parse_names(pairs: list[str]) -> dict[str, str]:
    names = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--name expects NAME=PATH, got {pair!r}")
        names[path] = name
    return names


@app.command("pack")
def pack_command(
    finetuned: list[Path] = typer.Argument(..., help="Fine-tuned checkpoints (file or folder)."),
    pretrained: Path = typer.Option(..., "--pretrained", help="The pretrained checkpoint."),
    out: Path = typer.Option(None, "--out", "-o", help="Archive to write, e.g. tasks.tvq."),
    scheme: str = typer.Option("tvq", help="tvq (task vectors), rtvq (base + offsets), fq."),
    bits: int = typer.Option(4, help="Bits per code for tvq and fq (1-8)."),
    base_bits: int = typer.Option(3, help="RTVQ: bits of the shared base vector."),
    offset_bits: int = typer.Option(2, help="RTVQ: bits of each task's offset."),
    group_size: int = typer.Option(
        DEFAULT_GROUP_SIZE,
        help="Elements per quantization range along the last dimension; "
        "0 = one range per tensor (the paper's setting).",
    ),
    error_correction: bool = typer.Option(
        True,
        "--error-correction/--no-error-correction",
        help="RTVQ: take offsets against the quantized base (the paper's correction).",
    ),
    range_method: str = typer.Option(
        DEFAULT_RANGE,
        "--range",
        help="search: least-squares clipping per group; minmax: the paper's min-max ranges.",
    ),
    scale_bits: int = typer.Option(
        DEFAULT_SCALE_BITS,
        help="Bits per group step (4-8, log-coded under one fp32 scale per tensor); 0 = fp32.",
    ),
    codec: str = typer.Option(
        DEFAULT_CODEC,
        help="zstd-c: entropy-code the codes (lossless; zstd: format 2's layout); raw: "
        "bit-packed only.",
    ),
    budget: float = typer.Option(
        None,
        help="Bits per weight for the whole archive (all bytes counted), down to a fraction of "
        "a bit: choose per tensor and role among dense bit widths and low-rate settings for the "
        "least error; overrides --bits/--base-bits/--offset-bits.",
    ),
    weighting: str = typer.Option(
        "params",
        help="With --budget: params (total squared error) or uniform (each tensor counts "
        "the same, by relative error).",
    ),
    keep: list[str] = typer.Option([], "--keep", help="Glob of tensor names to keep exact."),
    name: list[str] = typer.Option([], "--name", help="NAME=PATH: name a task (repeatable)."),
    max_shard_size: str = typer.Option(
        None,
        "--max-shard-size",
        help="Write a sharded archive: the folder --out, of NAME-0000k-of-0000n.tvq shards of "
        "at most this size (e.g. 5GB) and NAME.tvq.index.json.",
    ),
    ray: str = typer.Option(
        None,
        "--ray",
        help="Write the shards of a sharded archive (--max-shard-size) in Ray tasks: local, or "
        "a Ray cluster's address; inputs and output on storage every node shares.",
    ),
    dry: bool = typer.Option(False, "--dry-run", help="Report the exact size; write nothing."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing archive."),
    threads: int = typer.Option(
        None,
        "--threads",
        help="Worker threads (default: all cores this process may use; with --ray, 1 per task).",
    ),
    device: str = typer.Option(
        "cpu", "--device", help="Where to quantize: cpu, or cuda when a GPU is present."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Quantize the task vectors of FINETUNED checkpoints or LoRA adapters into one archive."""
    from ..pack import PackOptions, dry_run, pack
    from ..quant import native

    options = PackOptions(
        scheme=scheme,
        bits=bits,
        base_bits=base_bits,
        offset_bits=offset_bits,
        group_size=group_size,
        keep=tuple(keep),
        error_correction=error_correction,
        range=range_method,
        scale_bits=scale_bits,
        codec=codec,
        budget=budget,
        weighting=weighting,
    )
    names = parse_names(name)
    if dry:
        result = dry_run(pretrained, finetuned, options, names, show_progress(quiet))
        print_notes(result.notes)
        stdout.print(
            f"dry run: {result.size_bytes} bytes ({human_bytes(result.size_bytes)}) for "
            f"{len(result.header.tasks)} tasks, {result.bits_per_weight:.4f} bits per weight, "
            f"{result.ratio_vs_fp32:.2f}x smaller than fp32 checkpoints"
        )
        _print_allocation(result)
        return
    if out is None:
        raise UsageError("--out is required (or use --dry-run)")
    result = pack(
        pretrained,
        finetuned,
        out,
        options,
        names,
        overwrite=force,
        progress=show_progress(quiet),
        threads=threads,
        device=device,
        max_shard_size=max_shard_size,
        ray=ray,
    )
    print_notes(result.notes)
    tasks = result.header.tasks
    stdout.print(
        f"wrote {out}: {human_bytes(result.size_bytes)}, {len(tasks)} tasks "
        f"({', '.join(tasks)}), {result.bits_per_weight:.3f} "
        f"bits per weight, {result.ratio_vs_fp32:.2f}x smaller than fp32, "
        f"{result.seconds:.1f} s"
    )
    _print_allocation(result)
    if show_progress(quiet) and not native.built():  # for people, like the progress bar
        stderr.print(
            "tvq: note: the native kernels were not built (no C compiler at install), so pack "
            "ran their torch references: same archive, 2-3.5x slower"
        )


def _print_allocation(result: PackResult) -> None:
    """With --budget: the predicted error and the chosen bits, by role, in parameters."""
    alloc = result.allocation
    if alloc is None:
        return
    uniform = (
        "" if alloc.uniform_error is None else f" (best uniform bits: {alloc.uniform_error:.4f})"
    )
    stdout.print(
        f"allocation for {result.header.bits_per_weight(alloc.budget_bytes):.3f} bpw budget: "
        f"predicted rel-L2 {alloc.rel_error:.4f}{uniform}"
    )
    for row in quantization_settings(result.header):
        setting = f"{row['bits']} bits, group {row['group_size']}" if "bits" in row else "low-rate"
        stdout.print(f"  {row['role']}: {setting}: {row['parameters']:,} parameters")
