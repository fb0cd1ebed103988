"""The `tvq` command line: a thin Typer layer over the library API, one module per command.

Every user error is one line on stderr and a non-zero exit code, never a traceback; a bug
(`InternalError`, or any other exception) keeps its traceback. Command modules import the
library inside their command functions, so `tvq --version`, `--help` and `tvq inspect` (without
`--against`) start without torch (docs/architecture.md).
"""

from __future__ import annotations

import typer

from ..version import __version__
from . import demo, inspect, pack, store  # noqa: F401 - importing registers each command
from . import merge as merge_cli
from .common import app
from .main import main
from .zoo import zoo_app

__all__ = ["app", "main"]

app.add_typer(zoo_app, name="zoo")
merge_cli.register(app)


def _version_callback(value: bool) -> None:
    if value:
        print(f"tvq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True),
) -> None:
    """tvq: bit-packed quantized task vectors, and merging them back into models."""
