"""`tvq merge --ray`: the shards of a merged model folder merged by Ray tasks, one per shard.

The driver checks the merge and plans the folder as a single-process merge does
(`model_out.write_models`, `io.ModelWriter`: companion files, shard plan), then hands each
weight shard to a task: the request (paths and options), the shard's file name and tensors.
The task opens the archives and the pretrained model on shared storage, merges its tensors
with the single-process code (`model_out.stream_tensors`) and writes its shard; it sends back
only the pretrained tensors' digests. The driver checks the pretrained fingerprint, writes the
index and renames the folder into place: the same bytes as a single-process merge with the same
`--max-shard-size`. A method's whole-model statistics passes (TIES' global cut-offs, EMR) run
on the driver first; the tasks get the method with its statistics (a few numbers per task).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..concurrency import collector_paused, fixed_mmap_threshold, torch_threads
from ..io.checkpoint import TensorSpec
from ..io.model_writer import ModelWriter, SafetensorsStream
from ..ray_cluster import ray_session, run_tasks
from .base import MergeMethod
from .engine import Engine
from .model_out import Streamer, stream_tensors
from .request import Merge, MergeRequest, open_merge


@dataclass
class ModelShardJob:
    """What one Ray task needs to write one weight shard: paths and options, no tensors."""

    request: MergeRequest
    method: MergeMethod  # with its statistics, taken by the driver (pickled small state)
    path: Path
    specs: dict[str, TensorSpec]  # the shard's tensors, in order, as written
    metadata: dict[str, str]


def merge_shard(job: ModelShardJob) -> dict[str, bytes]:
    """Runs in a Ray worker: merge and write one shard; returns the pretrained digests."""
    merge = open_merge(job.request)
    merge.method = job.method
    engine = Engine(merge)
    fixed_mmap_threshold()
    intra_op = 1 if merge.method.elementwise else merge.threads
    try:
        with torch_threads(intra_op), collector_paused():
            stream = SafetensorsStream(job.path, job.specs, job.metadata)
            try:
                digests = stream_tensors(merge, engine, [stream], job.specs, list(job.specs))
            except BaseException:
                stream.discard()
                raise
            stream.close()
    finally:
        engine.close()
        merge.pretrained.close()
    return digests


def stream_on_ray(address: str) -> Streamer:
    """A `model_out.Streamer` that writes each shard of the one model in a Ray task on the
    cluster at `address`, `--threads` cores each (default 1)."""

    def stream(
        merge: Merge, engine: Engine, writers: list[ModelWriter], specs: dict[str, TensorSpec]
    ) -> dict[str, bytes]:
        (writer,) = writers
        request = replace(
            merge.request,
            archives=[Path(a).absolute() for a in merge.request.archives],
            pretrained=Path(merge.request.pretrained).absolute(),
            threads=merge.threads,
        )  # a worker's folder is not the driver's: absolute paths on the shared storage
        jobs = [
            ModelShardJob(request, merge.method, path.absolute(), shard, writer.metadata)
            for path, shard in writer.shards
        ]
        with ray_session(address) as ray:
            results = run_tasks(ray, merge_shard, jobs, merge.threads)
        writer.adopt()
        return {name: digest for result in results for name, digest in result.items()}

    return stream
