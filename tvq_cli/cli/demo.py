"""`tvq demo`: the whole tool on the example zoo, every step a printed command."""

from __future__ import annotations

from pathlib import Path

import typer

from ..demo import DEFAULT_DIR, run_demo
from .common import app, echo_plain
from .main import main


@app.command("demo")
def demo_command(
    out: Path = typer.Option(
        DEFAULT_DIR, "--dir", help="Working folder (a zoo already built there is reused)."
    ),
) -> None:
    """Build the example zoo, pack it, merge it and score it: every step a printed command."""
    run_demo(out, run=main, echo=echo_plain)  # every step a real command through the entry point
