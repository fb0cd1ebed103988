"""`tvq pack --ray`: the shards of a sharded archive packed by Ray tasks, one task per shard.

The driver plans the archive and its shards as a single-process pack does (`ArchiveWriter`),
then hands each shard to a task: the input paths, the header and the shard's file name. The
task opens the inputs on shared storage, codes the tensors with stored tensors in its shard
(`run.code_tensors`, the single-process code) and writes the shard (`ShardWriter`); it sends
back only checksums, sizes and digests. The driver then writes every shard's header and the
index, so the archive is byte for byte the one a single process writes with the same
`--max-shard-size`. A tensor whose stored tensors straddle two shards is coded by both tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..archive.format import ArchiveHeader, entry_layout, file_key
from ..archive.writer import ArchiveWriter, ShardTarget, ShardWriter
from ..errors import InternalError
from ..io.checkpoint import Checkpoint, combine_digests
from ..io.task_source import TaskSource
from ..ray_cluster import ray_session, run_tasks
from .options import PackOptions
from .plan import PackPlan
from .run import code_tensors, open_inputs, resolve_device


@dataclass
class ShardJob:
    """What one Ray task needs to write one shard: paths and a description, no tensors."""

    target: ShardTarget
    header: ArchiveHeader
    entries: list[str]  # tensors with a stored tensor in the shard, in order
    files: dict[str, bytes]  # the shard's small files: key -> zstd frame
    pretrained: Path
    finetuned: list[Path]
    options: PackOptions
    device: str
    threads: int


@dataclass
class ShardResult:
    checksums: dict[str, int]
    sizes: dict[str, int]
    digests: dict[str, bytes]  # the pretrained tensors read
    task_digests: list[dict[str, bytes]]  # each fine-tune's tensors read
    unchanged: list[int] = field(default_factory=list)


def pack_shard(job: ShardJob) -> ShardResult:
    """Runs in a Ray worker: code and write one shard."""
    pre, fts = open_inputs(job.pretrained, job.finetuned)
    try:
        wanted = set(job.entries)
        entries = [e for e in job.header.tensors if e.name in wanted]
        with ShardWriter(job.target) as writer:
            digests, unchanged = code_tensors(
                job.header,
                entries,
                pre,
                fts,
                job.options,
                resolve_device(job.device),
                job.threads,
                False,
                writer.write,
            )
            for key, frame in job.files.items():
                writer.write(key, frame)
        return ShardResult(
            writer.checksums,
            writer.sizes,
            digests,
            [source.read_digests() for source in fts],
            unchanged,
        )
    finally:
        for source in fts:
            source.close()
        pre.close()


def write_archive_on_ray(
    address: str,
    plan: PackPlan,
    pre: Checkpoint,
    fts: list[TaskSource],
    out: Path,
    options: PackOptions,
    device: str,
    threads: int,
    max_shard: int,
    replace: bool,
) -> list[int]:
    """`run.write_archive` with each shard written by a Ray task on the cluster at `address`.
    Returns the tasks whose task vector is all zero."""
    header = plan.header
    with ArchiveWriter(out, header, max_shard, replace) as writer:
        jobs = [_job(target, plan, pre, fts, options, device, threads) for target in writer.shards]
        with ray_session(address) as ray:
            results = run_tasks(ray, pack_shard, jobs, threads)
        checksums, sizes, digests = {}, {}, {}
        unchanged = set(range(len(fts)))
        for result in results:
            checksums.update(result.checksums)
            sizes.update(result.sizes)
            digests.update(result.digests)
            unchanged &= set(result.unchanged)
            for source, read in zip(fts, result.task_digests, strict=True):
                source.adopt_digests(read)
        if set(digests) != {e.name for e in header.tensors}:
            raise InternalError("a tensor was coded by no shard")
        writer.adopt(checksums, sizes)
        header.pretrained_fingerprint = combine_digests(digests)
        for task, source in zip(header.tasks, fts, strict=True):
            header.task_info[task].fingerprint = source.fingerprint()
    return sorted(unchanged)


def _job(
    target: ShardTarget,
    plan: PackPlan,
    pre: Checkpoint,
    fts: list[TaskSource],
    options: PackOptions,
    device: str,
    threads: int,
) -> ShardJob:
    header = plan.header
    keys = set(target.keys)
    entries = [
        e.name for e in header.tensors if any(s.key in keys for s in entry_layout(header, e))
    ]
    frames = {file_key(sha): plan.files.frames[sha] for sha in sorted(header.files)}
    files = {key: frame for key, frame in frames.items() if key in keys}
    target = replace(target, path=target.path.absolute())  # a worker's folder is not ours
    finetuned = [s.path.absolute() for s in fts]
    return ShardJob(
        target, header, entries, files, pre.path.absolute(), finetuned, options, device, threads
    )
