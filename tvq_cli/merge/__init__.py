"""`tvq merge`: merge task vectors from archives back into deployable models.

    from tvq_cli.merge import MergeRequest, merge
    report = merge(MergeRequest(["tasks.tvq"], "pre/", "merged/", "ties", {"lambda": 0.4}))

Methods live one per module in `tvq_cli.merge.methods`, registered by name (`list_methods()`).
"""

from .base import MergeMethod, Option, all_methods
from .engine import MergeRequest, run_merge

merge = run_merge


def list_methods() -> list[dict]:
    """Every registered method with its formula, paper and options (defaults included)."""
    return [
        {
            "name": cls.name,
            "summary": cls.summary,
            "formula": cls.formula,
            "paper": cls.paper,
            "per_task": cls.per_task,
            "takes_weights": cls.takes_weights,
            "options": [
                {
                    "flag": o.flag,
                    "default": o.shown_default,
                    "help": o.help,
                }
                for o in cls.options
            ],
        }
        for cls in all_methods()
    ]


__all__ = ["MergeMethod", "MergeRequest", "Option", "list_methods", "merge", "run_merge"]
