"""The `tvq` command line: a thin Typer layer over the library API.

Every user error is one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console

from . import __version__
from .cli_zoo import zoo_app
from .demo import DEFAULT_DIR as DEFAULT_DEMO_DIR
from .demo import run_demo
from .errors import TvqError
from .merge import MergeRequest, list_methods, merge
from .merge.sources import parse_task_list
from .pack import (
    DEFAULT_CODEC,
    DEFAULT_GROUP_SIZE,
    DEFAULT_RANGE,
    DEFAULT_SCALE_BITS,
    PackOptions,
    PackResult,
    dry_run,
    pack,
)
from .quant import native
from .render import human_bytes, render_inspect, render_merge, render_methods
from .report import inspect_archive, quantization_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Store many fine-tunes of one model as bit-packed quantized task vectors.",
    pretty_exceptions_enable=False,
)
app.add_typer(zoo_app, name="zoo")
stdout = Console()
stderr = Console(stderr=True)


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _parse_names(pairs: list[str]) -> dict[str, str]:
    names = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise TvqError(f"--name expects NAME=PATH, got {pair!r}")
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
        DEFAULT_CODEC, help="zstd: entropy-code the codes (lossless); raw: bit-packed only."
    ),
    budget: float = typer.Option(
        None,
        help="Bits per weight for the whole archive (all bytes counted): choose bits per "
        "tensor and role for the least error; overrides --bits/--base-bits/--offset-bits.",
    ),
    weighting: str = typer.Option(
        "params",
        help="With --budget: params (total squared error) or uniform (each tensor counts "
        "the same, by relative error).",
    ),
    keep: list[str] = typer.Option([], "--keep", help="Glob of tensor names to keep exact."),
    name: list[str] = typer.Option([], "--name", help="NAME=PATH: name a task (repeatable)."),
    dry: bool = typer.Option(False, "--dry-run", help="Report the exact size; write nothing."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing archive."),
    threads: int = typer.Option(
        None, "--threads", help="Worker threads (default: all cores this process may use)."
    ),
    device: str = typer.Option(
        "cpu", "--device", help="Where to quantize: cpu, or cuda when a GPU is present."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Quantize the task vectors of FINETUNED checkpoints into one archive."""
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
    names = _parse_names(name)
    if dry:
        result = dry_run(pretrained, finetuned, options, names)
        params = sum(t.numel for t in result.header.tensors)
        tasks = len(result.header.tasks)
        stdout.print(
            f"dry run: {result.size_bytes} bytes ({human_bytes(result.size_bytes)}) for "
            f"{tasks} tasks, {8 * result.size_bytes / (tasks * params):.4f} bits per weight, "
            f"{tasks * params * 4 / result.size_bytes:.2f}x smaller than fp32 checkpoints"
        )
        _print_allocation(result)
        return
    if out is None:
        raise TvqError("--out is required (or use --dry-run)")
    result = pack(
        pretrained,
        finetuned,
        out,
        options,
        names,
        overwrite=force,
        progress=_show_progress(quiet),
        threads=threads,
        device=device,
    )
    params = sum(t.numel for t in result.header.tensors)
    tasks = len(result.header.tasks)
    stdout.print(
        f"wrote {out}: {human_bytes(result.size_bytes)}, {tasks} tasks "
        f"({', '.join(result.header.tasks)}), {8 * result.size_bytes / (tasks * params):.3f} "
        f"bits per weight, {tasks * params * 4 / result.size_bytes:.2f}x smaller than fp32, "
        f"{result.seconds:.1f} s"
    )
    _print_allocation(result)
    if _show_progress(quiet) and not native.built():  # for people, like the progress bar
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
        f"allocation for {8 * alloc.budget_bytes / _weights(result):.3f} bpw budget: "
        f"predicted rel-L2 {alloc.rel_error:.4f}{uniform}"
    )
    for row in quantization_settings(result.header):
        stdout.print(
            f"  {row['role']}: {row['bits']} bits, group {row['group_size']}: "
            f"{row['parameters']:,} parameters"
        )


def _weights(result: PackResult) -> int:
    return len(result.header.tasks) * sum(t.numel for t in result.header.tensors)


@app.command("inspect")
def inspect_command(
    archive: Path = typer.Argument(..., help="The archive to inspect."),
    checkpoints: list[Path] = typer.Argument(
        None, help="With --against: PRE FT1 FT2 ... (fine-tunes in the archive's task order)."
    ),
    against: bool = typer.Option(
        False, "--against", help="Measure error against the original checkpoints given after it."
    ),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    verify: bool = typer.Option(
        False, "--verify", help="Read the whole archive and check every checksum; exit 1 on damage."
    ),
) -> None:
    """Storage report of an archive, and its error against the original checkpoints."""
    checkpoints = checkpoints or []
    if against and len(checkpoints) < 2:
        raise TvqError("--against needs the pretrained checkpoint and the fine-tuned ones")
    if checkpoints and not against:
        raise TvqError("extra paths given: use --against PRE FT1 FT2 ... to compare")
    pair = (checkpoints[0], checkpoints[1:]) if against else None
    report = inspect_archive(archive, against=pair, per_tensor=tensors, verify=verify)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render_inspect(report, stdout)


@app.command("merge")
def merge_command(
    archives: list[Path] = typer.Argument(None, help="Archives holding the task vectors."),
    pretrained: Path = typer.Option(None, "--pretrained", help="The pretrained checkpoint."),
    method: str = typer.Option(None, "--method", "-m", help="Merge method (--list-methods)."),
    out: Path = typer.Option(
        None, "--out", "-o", help="NAME.safetensors, a folder, or NAME.tvq (quantized)."
    ),
    lam: float = typer.Option(None, "--lambda", help="Scaling coefficient."),
    topk: float = typer.Option(None, "--topk", help="ties/dare: percent of magnitudes kept."),
    topk_scope: str = typer.Option(None, "--topk-scope", help="ties/dare: global or tensor."),
    p: float = typer.Option(None, "--p", help="dare: drop probability."),
    then: str = typer.Option(None, "--then", help="dare: task_arithmetic or ties."),
    alpha: float = typer.Option(None, "--alpha", help="lines: base coefficient."),
    beta: float = typer.Option(None, "--beta", help="lines / breadcrumbs: see docs/merge.md."),
    gamma: float = typer.Option(None, "--gamma", help="breadcrumbs: outlier fraction dropped."),
    k: float = typer.Option(None, "--k", help="consensus: masks that must agree."),
    mask_lambda: float = typer.Option(None, "--mask-lambda", help="tall / consensus: mask lambda."),
    weights: str = typer.Option(None, "--weights", help="Per-task weights, e.g. 1,0.5,2."),
    tasks: str = typer.Option(None, "--tasks", help="Merge only these tasks, e.g. a,b."),
    task: str = typer.Option(None, "--task", help="tall / emr: the task whose model to write."),
    all_tasks: bool = typer.Option(False, "--all-tasks", help="tall / emr: one model per task."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw (dare, rounding)."),
    dtype: str = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default: as input)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Folder shard size."),
    bits: int = typer.Option(None, "--bits", help=".tvq output: bits per code."),
    group_size: int = typer.Option(None, "--group-size", help=".tvq output: group size."),
    rounding: str = typer.Option(None, "--rounding", help=".tvq output: nearest or noise."),
    samples: int = typer.Option(None, "--samples", help=".tvq output: noise samples (16)."),
    tie_tolerance: float = typer.Option(
        None, "--tie-tolerance", help=".tvq output: distance to a midpoint that is a tie."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing output; merge despite a fingerprint mismatch."
    ),
    list_methods_flag: bool = typer.Option(False, "--list-methods", help="List the methods."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    threads: int = typer.Option(
        None, "--threads", help="Worker threads (default: all cores this process may use)."
    ),
) -> None:
    """Merge task vectors from ARCHIVES into a model (or a quantized one-task archive)."""
    if list_methods_flag:
        methods = list_methods()
        if as_json:
            print(json.dumps(methods, indent=2))
        else:
            render_methods(methods, stdout)
        return
    for value, flag in ((archives, "ARCHIVE"), (pretrained, "--pretrained"), (out, "--out")):
        if not value:
            raise TvqError(f"{flag} is required (see 'tvq merge --help')")
    if method is None:
        raise TvqError("--method is required (see 'tvq merge --list-methods')")
    flags = {
        "lambda": lam,
        "topk": topk,
        "topk_scope": topk_scope,
        "p": p,
        "then": then,
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
        "k": k,
        "mask_lambda": mask_lambda,
    }
    options = {name: value for name, value in flags.items() if value is not None}
    request = MergeRequest(
        archives=list(archives),
        pretrained=pretrained,
        out=out,
        method=method,
        options=options,
        tasks=parse_task_list(tasks),
        weights=weights,
        seed=seed,
        dtype=dtype,
        task=task,
        all_tasks=all_tasks,
        force=force,
        max_shard_size=max_shard_size,
        bits=bits,
        group_size=group_size,
        rounding=rounding,
        samples=samples,
        tie_tolerance=tie_tolerance,
        threads=threads,
    )
    report = merge(request, progress=_show_progress(quiet))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render_merge(report, stdout)


@app.command("demo")
def demo_command(
    out: Path = typer.Option(
        DEFAULT_DEMO_DIR, "--dir", help="Working folder (a zoo already built there is reused)."
    ),
) -> None:
    """Build the example zoo, pack it, merge it and score it: every step a printed command."""
    run_demo(out, run=main, echo=_echo_plain)


def _echo_plain(text: str) -> None:
    """Print as is: no markup, and no line breaks inside a command that must stay typeable."""
    stdout.print(text, markup=False, highlight=False, soft_wrap=True)


def _version_callback(value: bool) -> None:
    if value:
        print(f"tvq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True),
) -> None:
    """tvq: bit-packed quantized task vectors, and merging them back into models."""


def _terminate(signum, frame) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn every failure into one line on stderr."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(args=argv, prog_name="tvq", standalone_mode=False)
        if code == 130:  # typer turns KeyboardInterrupt into a returned exit code
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            return code
    except TvqError as exc:
        print(f"tvq: error: {exc}", file=sys.stderr)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print("tvq: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"tvq: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # a usage error
            print(f"tvq: error: {exc.format_message()} (see 'tvq --help')", file=sys.stderr)
            return exc.exit_code
        raise
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
