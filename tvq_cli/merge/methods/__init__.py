"""One module per merge method; importing this package registers them all.

A new method is one module here with a `@register`ed `MergeMethod` subclass, imported below:
its options reach `tvq merge` and `--list-methods` from the registry. The command line reads
the registry at start-up, so a method imports torch inside the functions that compute.
"""

from ...errors import UsageError
from ..base import REGISTRY, MergeMethod
from . import (  # noqa: F401
    average,
    breadcrumbs,
    consensus,
    dare,
    emr,
    lines,
    magmax,
    tall,
    task_arithmetic,
    ties,
)


def method_class(name: str) -> type[MergeMethod]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown merge method {name!r} (choose from {', '.join(sorted(REGISTRY))})"
        ) from None


def all_methods() -> list[type[MergeMethod]]:
    return [REGISTRY[n] for n in sorted(REGISTRY)]
