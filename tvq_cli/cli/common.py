"""What every command shares: the Typer app, the consoles, progress, the demo's echo."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Store many fine-tunes of one model as bit-packed quantized task vectors.",
    pretty_exceptions_enable=False,
)
stdout = Console()
stderr = Console(stderr=True)


def show_progress(quiet: bool) -> bool:
    """A progress bar for people at a terminal, never in pipelines."""
    return not quiet and sys.stderr.isatty()


def echo_plain(text: str) -> None:
    """Print as is: no markup, and no line breaks inside a command that must stay typeable."""
    stdout.print(text, markup=False, highlight=False, soft_wrap=True)


def print_notes(notes: list[str]) -> None:
    """What a command mapped, assumed or left out: one line each on stderr."""
    for note in notes:
        stderr.print(f"tvq: note: {note}", markup=False, highlight=False, soft_wrap=True)
