"""`tvq merge` from start to end: check, run the statistics passes, write, report."""

from __future__ import annotations

import time

from ..concurrency import collector_paused, fixed_mmap_threshold, torch_threads
from ..io.target import claim_output
from .archive_out import ArchiveOutput
from .engine import Engine
from .model_out import write_models
from .packed_out import PackedOutput
from .request import Merge, MergeRequest, check_request
from .rounding import Rounding


def run_merge(
    request: MergeRequest, progress: bool = False, rounding: Rounding | None = None
) -> dict:
    """Check, merge and write; returns the report (schema in docs/merge.md). `rounding`
    replaces the request's rounding options (the selection-rule ablations of
    benchmarks/hdrq_rounding.py use it)."""
    start = time.perf_counter()
    merge = check_request(request)
    if rounding is None:
        rounding = Rounding.of(
            request.rounding, request.samples, request.tie_tolerance, request.seed
        )
    archive_output = _archive_output(merge, rounding) if request.writes_archive else None
    packed_output = PackedOutput(merge, rounding) if request.writes_packed else None  # checks
    engine = Engine(merge, progress)
    fixed_mmap_threshold()
    # blocks run on the engine's own threads; whole-tensor merges (quantized outputs, methods
    # that are not elementwise) keep torch's intra-op threads
    blocked = merge.method.elementwise and archive_output is None and packed_output is None
    intra_op = 1 if blocked else merge.threads
    claim = claim_output(merge.out, request.force, merge.inputs, request.folder_output)
    try:
        with claim, torch_threads(intra_op), collector_paused():
            engine.run_statistics()
            if archive_output is not None:
                output, rounded = archive_output.write(engine.tensors("merge"))
            elif packed_output is not None:
                output, rounded = packed_output.write(engine)
            elif request.ray is not None:
                from .distributed import stream_on_ray  # Ray only when asked for

                output, rounded = write_models(merge, engine, stream_on_ray(request.ray)), None
            else:
                output, rounded = write_models(merge, engine), None
    finally:
        engine.close()
    return report(merge, output, time.perf_counter() - start, rounded)


def _archive_output(merge: Merge, rounding: Rounding) -> ArchiveOutput:
    request = merge.request
    return ArchiveOutput(
        merge.out,
        merge.method,
        merge.sources,
        merge.pretrained,
        rounding,
        request.bits,
        request.group_size,
        request.force,
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
        "left_out_rows": merge.sources.left_out_rows,
        "output": output,
        "rounding": rounding,
        "seconds": seconds,
    }
