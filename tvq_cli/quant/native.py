"""The compiled kernels of `_native.c`, or None where the package was built without a C compiler.

Every caller keeps a torch path that computes the same values bit for bit, so a missing build
changes the speed of `tvq pack`, never its output. Callers read `native.lib` at call time (tests
set it to None to run the torch paths).
"""

from __future__ import annotations

F32, BF16, F16, NONE = 0, 1, 2, 3  # value kinds of the kernels' raw inputs (NONE: no minus)

try:
    from . import _native as lib
except ImportError:  # built without a C compiler
    lib = None


def built() -> bool:
    """Whether the native kernels were compiled at install."""
    return lib is not None
