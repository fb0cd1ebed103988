"""tvq: store many fine-tunes of one model as bit-packed quantized task vectors.

The library API mirrors the CLI:

    import tvq_cli
    result = tvq_cli.pack("pre/", ["ft_a/", "ft_b/"], "tasks.tvq", scheme="tvq", bits=4)
    archive = tvq_cli.open_archive("tasks.tvq")
    tau = archive.task_vector("ft_a", "layers.0.fc.weight")
    report = tvq_cli.inspect_archive("tasks.tvq", against=("pre/", ["ft_a/", "ft_b/"]))
"""

__version__ = "0.1.0"

from .archive import Archive, open_archive  # noqa: E402
from .checkpoint import Checkpoint  # noqa: E402
from .errors import TvqError  # noqa: E402
from .pack import PackOptions, PackResult, pack, plan_pack  # noqa: E402
from .report import inspect_archive  # noqa: E402

__all__ = [
    "Archive",
    "Checkpoint",
    "PackOptions",
    "PackResult",
    "TvqError",
    "__version__",
    "inspect_archive",
    "open_archive",
    "pack",
    "plan_pack",
]
