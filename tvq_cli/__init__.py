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
"""

from .archive import Archive, open_archive
from .archive.edit import remove_tasks
from .errors import InternalError, TvqError
from .io.checkpoint import Checkpoint
from .merge import extract, task_tensors
from .pack import PackOptions, PackResult, add_tasks, pack, plan_pack
from .report import inspect_archive
from .version import __version__

__all__ = [
    "Archive",
    "Checkpoint",
    "InternalError",
    "PackOptions",
    "PackResult",
    "TvqError",
    "__version__",
    "add_tasks",
    "extract",
    "inspect_archive",
    "open_archive",
    "pack",
    "plan_pack",
    "remove_tasks",
    "task_tensors",
]
