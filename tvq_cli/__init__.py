"""tvq: store many fine-tunes of one model as bit-packed quantized task vectors.

The library API mirrors the CLI:

    import tvq_cli
    result = tvq_cli.pack("pre/", ["ft_a/", "ft_b/"], "tasks.tvq", tvq_cli.PackOptions(bits=4))
    archive = tvq_cli.open_archive("tasks.tvq")
    tau = archive.task_vector("ft_a", "layers.0.fc.weight")
    report = tvq_cli.inspect_archive("tasks.tvq", against=("pre/", ["ft_a/", "ft_b/"]))

Rooms (docs/architecture.md): `io` reads checkpoints and writes models, `quant` is the
quantizer math, `archive` the file format and its schemes, `pack` and `merge` the two
pipelines, `report` what inspect prints, `cli` the command line over all of them.
"""

from .archive import Archive, open_archive
from .errors import InternalError, TvqError
from .io.checkpoint import Checkpoint
from .pack import PackOptions, PackResult, pack, plan_pack
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
    "inspect_archive",
    "open_archive",
    "pack",
    "plan_pack",
]
