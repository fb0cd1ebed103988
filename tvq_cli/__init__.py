"""tvq: store many fine-tunes of one model as bit-packed quantized task vectors.

The library API mirrors the CLI:

    import tvq_cli
    result = tvq_cli.pack("pre/", ["ft_a/", "ft_b/"], "tasks.tvq", tvq_cli.PackOptions(bits=4))
    archive = tvq_cli.open_archive("tasks.tvq")
    tau = archive.task_vector("ft_a", "layers.0.fc.weight")
    report = tvq_cli.inspect_archive("tasks.tvq", against=("pre/", ["ft_a/", "ft_b/"]))
    tvq_cli.add_tasks("tasks.tvq", "pre/", ["ft_c/"])          # append without re-encoding
    tvq_cli.remove_tasks("tasks.tvq", ["ft_b"])
    tvq_cli.extract("tasks.tvq", "ft_a", "pre/", "ft_a-rebuilt/")  # a folder transformers loads
    for name, tensor in tvq_cli.task_tensors("tasks.tvq", "ft_a", "pre/"):
        ...                                                   # serve without writing it

Rooms (docs/architecture.md): `io` reads checkpoints and writes models, `quant` is the
quantizer math, `archive` the file format and its schemes, `pack` and `merge` the two
pipelines, `report` what inspect prints, `cli` the command line over all of them.

The public names load on first use, so `import tvq_cli` does not import torch: the command
line's start-up (and a Ctrl-C during it, see `__main__`) is then in tvq's own hands.
"""

from __future__ import annotations

import importlib
import sys
import types

from .errors import InternalError, TvqError
from .version import __version__

_LAZY = {  # public name -> the module that defines it
    "Archive": ".archive",
    "Checkpoint": ".io.checkpoint",
    "add_tasks": ".pack",
    "extract": ".merge",
    "PackOptions": ".pack",
    "PackResult": ".pack",
    "inspect_archive": ".report",
    "open_archive": ".archive",
    "pack": ".pack",
    "plan_pack": ".pack",
    "remove_tasks": ".archive.edit",
    "task_tensors": ".merge",
}

__all__ = ["InternalError", "TvqError", "__version__", *_LAZY]


class _Package(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name not in _LAZY:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: object) -> None:
        # `pack` names the subpackage and the function: importing the subpackage sets it
        # here, and the function keeps the name (as when both were imported eagerly).
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
