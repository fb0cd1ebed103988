"""The `tvq` command (and `python -m tvq_cli`).

Importing the command line takes a tenth of a second (typer, rich; the commands import torch
when they run); a Ctrl-C meanwhile ends in the same one line as a Ctrl-C later, not in an
import traceback.
"""

from __future__ import annotations

import sys

INTERRUPTED = "tvq: interrupted; nothing was written"


def run() -> None:
    """Console-script entry point."""
    try:
        from .cli import main
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    sys.exit(main())


if __name__ == "__main__":
    run()
