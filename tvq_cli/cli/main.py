"""The entry point: run the app, and turn every user error into one line and an exit code."""

from __future__ import annotations

import signal
import sys

import typer

from ..errors import TvqError
from .common import app


def _terminate(signum, frame) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn every user error into one line on stderr."""
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
