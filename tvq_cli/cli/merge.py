"""`tvq merge`: merge task vectors from archives into a model (dense or packed), or into a
quantized archive.

The method coefficients (`--lambda`, `--topk`, ...) are not written here: they come from the
merge-method registry, so a new method is one module under `merge/methods`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import typer

from ..errors import UsageError
from ..merge import list_methods
from ..merge.base import Option
from ..merge.methods import all_methods
from ..report.render import render_merge, render_methods
from .common import show_progress, stdout

PREFIX = "method_"  # Python names of the generated coefficient parameters


def merge_command(
    archives: list[Path] = typer.Argument(None, help="Archives holding the task vectors."),
    pretrained: Path = typer.Option(None, "--pretrained", help="The pretrained checkpoint."),
    method: str = typer.Option(None, "--method", "-m", help="Merge method (--list-methods)."),
    out: Path = typer.Option(
        None, "--out", "-o", help="NAME.safetensors, a folder, or NAME.tvq (quantized)."
    ),
    quantize: str = typer.Option(
        None, "--quantize", help="w4 or w8: a compressed-tensors packed model folder."
    ),
    symmetric: bool = typer.Option(
        None, "--symmetric/--asymmetric", help="--quantize: grid with or without zero-points."
    ),
    quantize_ignore: list[str] = typer.Option(
        None, "--quantize-ignore", help="--quantize: keep layers matching GLOB dense."
    ),
    weights: str = typer.Option(None, "--weights", help="Per-task weights, e.g. 1,0.5,2."),
    tasks: str = typer.Option(None, "--tasks", help="Merge only these tasks, e.g. a,b."),
    task: str = typer.Option(None, "--task", help="tall / emr: the task whose model to write."),
    all_tasks: bool = typer.Option(False, "--all-tasks", help="tall / emr: one model per task."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw (dare, rounding)."),
    dtype: str = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default: as input)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Folder shard size."),
    bits: int = typer.Option(None, "--bits", help=".tvq output: bits per code."),
    group_size: int = typer.Option(
        None, "--group-size", help="Quantized output: group size (0: per tensor / channel)."
    ),
    rounding: str = typer.Option(
        None,
        "--rounding",
        help="Quantized output: nearest, floor or noise (default: noise on an FQ average's "
        "own grid, nearest elsewhere).",
    ),
    samples: int = typer.Option(None, "--samples", help="--rounding noise: candidates (16)."),
    tie_tolerance: float = typer.Option(
        None, "--tie-tolerance", help="Quantized output: distance to a midpoint that is a tie."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing output (a folder only if tvq wrote it)."
    ),
    allow_different_base: bool = typer.Option(
        False,
        "--allow-different-base",
        help="Merge archives packed against a different pretrained model than --pretrained.",
    ),
    list_methods_flag: bool = typer.Option(False, "--list-methods", help="List the methods."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ray: str = typer.Option(
        None,
        "--ray",
        help="Merge the shards of a model folder in Ray tasks: local, or a Ray cluster's "
        "address; inputs and output on storage every node shares.",
    ),
    threads: int = typer.Option(
        None,
        "--threads",
        help="Worker threads (default: all cores this process may use; with --ray, 1 per task).",
    ),
    **coefficients: object,
) -> None:
    """Merge task vectors from ARCHIVES into a model (dense or packed) or a quantized archive."""
    from ..merge import MergeRequest, merge
    from ..merge.sources import parse_task_list

    if list_methods_flag:
        methods = list_methods()
        if as_json:
            print(json.dumps(methods, indent=2))
        else:
            render_methods(methods, stdout)
        return
    for value, flag in ((archives, "ARCHIVE"), (pretrained, "--pretrained"), (out, "--out")):
        if not value:
            raise UsageError(f"{flag} is required (see 'tvq merge --help')")
    if method is None:
        raise UsageError("--method is required (see 'tvq merge --list-methods')")
    options = {
        key.removeprefix(PREFIX): value for key, value in coefficients.items() if value is not None
    }
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
        allow_different_base=allow_different_base,
        max_shard_size=max_shard_size,
        bits=bits,
        group_size=group_size,
        rounding=rounding,
        samples=samples,
        tie_tolerance=tie_tolerance,
        threads=threads,
        ray=ray,
        quantize=quantize,
        symmetric=symmetric,
        quantize_ignore=quantize_ignore or None,
    )
    report = merge(request, progress=show_progress(quiet))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render_merge(report, stdout)


def coefficient_parameters() -> list[inspect.Parameter]:
    """One optional CLI flag per coefficient name in the method registry. Values are checked
    by the method itself (ranges, whole numbers, choices), so the flags take numbers or text."""
    found: dict[str, list[tuple[str, Option]]] = {}
    for cls in all_methods():
        for option in cls.options:
            found.setdefault(option.name, []).append((cls.name, option))
    return [
        inspect.Parameter(
            PREFIX + name,
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, uses[0][1].flag, help=_help(uses)),
            annotation=(str if uses[0][1].choices or uses[0][1].kind is str else float) | None,
        )
        for name, uses in found.items()
    ]


def _help(uses: list[tuple[str, Option]]) -> str:
    """Each method's own words for the option; the shortest when many methods differ."""
    methods = " / ".join(method for method, _ in uses)
    helps = {option.help for _, option in uses}
    if len(helps) == 1:
        return f"{methods}: {helps.pop()}"
    if len(uses) == 2:
        return " ".join(f"{method}: {option.help}" for method, option in uses)
    return f"{methods}: {min(helps, key=len)}"


def _with_coefficients(command):
    """`command` with its `**coefficients` replaced by the registry's flags (Typer reads the
    signature)."""
    signature = inspect.signature(command, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    fixed = [p.replace(kind=p.KEYWORD_ONLY) for p in fixed]
    command.__signature__ = signature.replace(parameters=fixed + coefficient_parameters())
    return command


def register(app: typer.Typer) -> None:
    app.command("merge")(_with_coefficients(merge_command))
