"""One module per merge method; importing this package registers them all."""

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
