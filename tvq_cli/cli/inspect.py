"""`tvq inspect`: what an archive costs, and what error it adds."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import UsageError
from ..report import inspect_archive
from ..report.render import render_inspect
from .common import app, stdout


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
    allow_different_base: bool = typer.Option(
        False,
        "--allow-different-base",
        help="With --against: measure against a pretrained model other than the archive's.",
    ),
) -> None:
    """Storage report of an archive, and its error against the original checkpoints."""
    checkpoints = checkpoints or []
    if against and len(checkpoints) < 2:
        raise UsageError("--against needs the pretrained checkpoint and the fine-tuned ones")
    if checkpoints and not against:
        raise UsageError("extra paths given: use --against PRE FT1 FT2 ... to compare")
    if allow_different_base and not against:
        raise UsageError("--allow-different-base applies only with --against")
    pair = (checkpoints[0], checkpoints[1:]) if against else None
    report = inspect_archive(
        archive,
        against=pair,
        per_tensor=tensors,
        verify=verify,
        allow_different_base=allow_different_base,
    )
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render_inspect(report, stdout)
