"""`tvq zoo build` and `tvq zoo eval`: the example model zoo from the command line.

A thin layer over `tvq_cli.zoo`, so that every step `tvq demo` runs is a command a user can
type: build the zoo, pack it, merge it, and score any checkpoint against the zoo's tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import TvqError
from ..report.render import render_accuracy, render_zoo
from .common import stdout

zoo_app = typer.Typer(
    no_args_is_help=True,
    help="The example model zoo: a small pretrained MLP and 8 real fine-tunes on digits.",
)


@zoo_app.command("build")
def build_command(
    out: Path = typer.Argument(..., help="Folder to build the zoo in (reused if already built)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the whole build (same seed, same bytes)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a current zoo is there."),
) -> None:
    """Build the zoo: pretrained/, one folder per task, heads/ and zoo.json."""
    from ..zoo import build_zoo

    if out.exists() and not out.is_dir():
        raise TvqError(f"{out}: exists and is not a folder")
    zoo = build_zoo(out, seed=seed, force=force)
    render_zoo(zoo.manifest, str(zoo.root), stdout)


@zoo_app.command("eval")
def eval_command(
    checkpoint: Path = typer.Argument(
        ..., help="A backbone: .safetensors file, model folder, or sharded folder."
    ),
    zoo_dir: Path = typer.Option(..., "--zoo", help="The zoo folder (tvq zoo build)."),
    tasks: str = typer.Option(None, "--tasks", help="Only these tasks, e.g. digit,parity."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Per-task test accuracy of CHECKPOINT, each task through its own head."""
    from ..merge.sources import parse_task_list
    from ..zoo import Zoo, evaluate, mean_accuracy

    zoo = Zoo.load(zoo_dir)
    accuracy = evaluate(checkpoint, zoo, parse_task_list(tasks))
    report = {
        "checkpoint": str(checkpoint),
        "accuracy": accuracy,
        "mean": mean_accuracy(accuracy),
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render_accuracy(report, stdout)
