"""The one exception type the library raises for bad input; the CLI turns it into one line."""


class TvqError(Exception):
    """A user-facing error: bad input, a damaged archive, a mismatch. Never a bug."""
