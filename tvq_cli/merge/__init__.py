"""`tvq merge`: merge task vectors from archives back into deployable models.

    from tvq_cli.merge import MergeRequest, merge
    report = merge(MergeRequest(["tasks.tvq"], "pre/", "merged/", "ties", {"lambda": 0.4}))

Methods live one per module in `tvq_cli.merge.methods`, registered by name (`list_methods()`).
`request` checks a merge, `engine` streams task vectors and merges them tensor by tensor,
`model_out` / `packed_out` / `archive_out` write the result (a dense model, a
compressed-tensors folder, a `.tvq` archive; `rounding` puts values on a grid), `run` ties
them together. `rebuild` gives one task's fine-tune back (`tvq extract`, and a stream of its
tensors for serving code).

The registry (`base`, `methods`) imports no torch, so `tvq merge --help` and `--list-methods`
start fast; the pipeline's names load on first use.
"""

import importlib

from .base import MergeMethod, Option
from .methods import all_methods, method_class

_LAZY = {  # name -> (module, attribute): the pipeline, which imports torch
    "MergeRequest": (".request", "MergeRequest"),
    "extract": (".rebuild", "extract"),
    "merge": (".run", "run_merge"),
    "run_merge": (".run", "run_merge"),
    "task_tensors": (".rebuild", "task_tensors"),
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value
    return value


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


__all__ = [
    "MergeMethod",
    "MergeRequest",
    "Option",
    "all_methods",
    "extract",
    "list_methods",
    "merge",
    "method_class",
    "run_merge",
    "task_tensors",
]
