"""The library's two exception types: one for the user, one for bugs.

The CLI turns a `TvqError` into one line on stderr; an `InternalError` is a bug in tvq and keeps
its traceback, so it can be reported and fixed.
"""


class TvqError(Exception):
    """A user-facing error: bad input, a damaged archive, a mismatch. Never a bug."""


class InternalError(RuntimeError):
    """A broken invariant inside tvq (a bug), never caused by the user's input."""
