"""`tvq pack`: plan an archive, read checkpoints tensor by tensor, quantize and write.

`options` (settings) -> `plan` (names, checks, header) -> `alloc` (bits under a budget) ->
`run` (the pipeline: `prefetch` reads, `packer` dispatches each tensor to the `blocked` or
`whole` route, the archive writer writes). `records` is what an archive keeps of each task's
checkpoint; `add` appends tasks to an archive (`tvq add`).
"""

from .add import add_tasks
from .options import PackOptions
from .plan import plan_pack
from .run import PackResult, dry_run, pack

__all__ = ["PackOptions", "PackResult", "add_tasks", "dry_run", "pack", "plan_pack"]
