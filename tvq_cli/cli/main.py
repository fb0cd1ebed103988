"""The entry point: run the app, turn every user error into one line and an exit code, and
every `TvqWarning` into one `tvq: warning:` line.

Exit codes: 0 success; 1 an error in the inputs or the system (files missing, damaged or
mismatched, an output already there, a full disk); 2 a usage error (`UsageError`, or one of
click's own: the command line is wrong); 130 interrupted.
"""

from __future__ import annotations

import signal
import sys
import warnings

import typer

from ..__main__ import INTERRUPTED
from ..errors import TvqError, TvqWarning, UsageError
from .common import app

USAGE = 2


def _terminate(signum, frame) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn every user error into one line on stderr."""
    signal.signal(signal.SIGTERM, _terminate)
    with warnings.catch_warnings():
        warnings.simplefilter("always", TvqWarning)
        warnings.showwarning = _warning_line(warnings.showwarning)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        code = app(args=argv, prog_name="tvq", standalone_mode=False)
        if code == 130:  # typer turns KeyboardInterrupt into a returned exit code
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            return code
    except UsageError as exc:
        print(f"tvq: error: {exc}", file=sys.stderr)
        return USAGE
    except TvqError as exc:
        print(f"tvq: error: {exc}", file=sys.stderr)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"tvq: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click's usage error
            if exc.format_message():  # empty after printing the help of a bare `tvq`
                print(f"tvq: error: {exc.format_message()} (see 'tvq --help')", file=sys.stderr)
            return exc.exit_code
        raise
    return 0


def _warning_line(show):
    """`warnings.showwarning` that prints tvq's own warnings as one line."""

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, TvqWarning):
            print(f"tvq: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning
