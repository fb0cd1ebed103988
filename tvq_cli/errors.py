"""The library's exception and warning types: for the user, for the command line, for bugs.

The CLI turns a `TvqError` into one line on stderr and exit code 1, a `UsageError` into exit
code 2, and a `TvqWarning` into one `tvq: warning:` line; an `InternalError` is a bug in tvq
and keeps its traceback, so it can be reported and fixed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


class TvqError(Exception):
    """A user-facing error: bad input, a damaged archive, a mismatch. Never a bug."""


class UsageError(TvqError):
    """The command line itself is wrong: an option or argument is missing, unknown, malformed,
    out of range, not among its choices, in conflict with another, or names something (a
    task, a method) that is not there. What files hold, and what the system does (missing,
    damaged or mismatched files, an output already there, a full disk), is a `TvqError`."""


class InternalError(RuntimeError):
    """A broken invariant inside tvq (a bug), never caused by the user's input."""


class TvqWarning(UserWarning):
    """Something the user should know that does not stop the work (a likely mistake, a file
    cleaned up): one line on stderr from the CLI, a Python warning for library callers."""


def warn(message: str) -> None:
    warnings.warn(message, TvqWarning, stacklevel=2)


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Checks of option values that share code with checks of files (a bit width is checked
    in an archive's header too): their errors in this block are usage errors."""
    try:
        yield
    except UsageError:
        raise
    except TvqError as exc:
        raise UsageError(str(exc)) from None
