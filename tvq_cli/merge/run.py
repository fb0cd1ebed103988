"""`tvq merge` from start to end: check, run the statistics passes, write, report."""

from __future__ import annotations

import time

from ..concurrency import collector_paused, fixed_mmap_threshold, torch_threads
from .archive_out import ArchiveOutput, Rounding
from .engine import Engine
from .model_out import write_models
from .request import Merge, MergeRequest, check_request


def run_merge(request: MergeRequest, progress: bool = False) -> dict:
    """Check, merge and write; returns the report (schema in docs/merge.md)."""
    start = time.perf_counter()
    merge = check_request(request)
    archive_output = _archive_output(merge) if request.quantized else None  # checks first
    engine = Engine(merge, progress)
    fixed_mmap_threshold()
    # blocks run on the engine's own threads; whole-tensor methods keep torch's intra-op threads
    intra_op = 1 if merge.method.elementwise else merge.threads
    try:
        with torch_threads(intra_op), collector_paused():
            engine.run_statistics()
            if archive_output is not None:
                output, rounding = archive_output.write(engine.tensors("merge"))
            else:
                output, rounding = write_models(merge, engine), None
    finally:
        engine.close()
    return report(merge, output, time.perf_counter() - start, rounding)


def _archive_output(merge: Merge) -> ArchiveOutput:
    request = merge.request
    return ArchiveOutput(
        merge.out,
        merge.method,
        merge.sources,
        merge.pretrained,
        Rounding.of(request),
        request.bits,
        request.group_size,
    )


def report(merge: Merge, output: dict, seconds: float, rounding: dict | None = None) -> dict:
    method = merge.method
    return {
        "method": method.name,
        "formula": method.formula,
        "tasks": merge.sources.tasks,
        "archives": [str(a.path) for a in merge.sources.archives],
        "coefficients": method.coefficients(),
        "weights": method.ctx.weights.tolist() if merge.weights_given else None,
        "seed": merge.request.seed,
        "fingerprint_mismatch": merge.sources.mismatched,
        "output": output,
        "rounding": rounding,
        "seconds": seconds,
    }
