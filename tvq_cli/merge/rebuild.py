"""`tvq extract`: one task's fine-tune rebuilt from an archive, `theta_pre + tau_hat`, in its
own dtypes, with the rows it added (new tokens), its tied copies and its small files, as a
folder transformers loads (or one .safetensors file).

`task_tensors` streams the same tensors to serving code without writing them. Either way one
tensor is in memory at a time. Tensor names are the pretrained checkpoint's (those
transformers loads), also for a fine-tune packed from other names (a PEFT wrapper's
`base_model.model.` prefix, a base-class save).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..archive.format import TaskInfo
from ..archive.identity import check_task_source, task_fingerprint
from ..archive.reader import Archive
from ..concurrency import Writer
from ..dtypes import to_torch
from ..errors import TvqError, UsageError, usage_errors
from ..io.atomic import atomic_output
from ..io.checkpoint import Checkpoint, TensorSpec, combine_digests, tensor_digest
from ..io.compat import check_pretrained
from ..io.model_files import CONFIG, fit_config, read_companions, write_companions
from ..io.model_writer import DEFAULT_MAX_SHARD, ModelWriter, parse_size
from ..io.target import check_target, claim_output
from ..io.task_source import TaskSource
from ..io.tasks import open_task
from ..stats import ErrorStats
from ..tensors import require_finite
from .stream import task_vector_into


class Rebuild:
    """One task's tensors from an archive and the pretrained checkpoint, in file order."""

    def __init__(self, archive: Archive, task: str, pretrained: Checkpoint):
        if task not in archive.tasks:
            raise UsageError(
                f"{archive.path}: no task named {task!r} (has {', '.join(archive.tasks)})"
            )
        check_pretrained(pretrained)
        archive.check_model(pretrained)
        self.archive, self.task, self.pre = archive, task, pretrained
        self.info: TaskInfo = archive.info(task)
        self._digests: dict[str, bytes] = {}

    @property
    def _copies(self) -> dict[str, str]:
        """Tensor -> the explicit copy of it the task's checkpoint held (a tied head)."""
        return {original: copy for copy, original in self.info.copies.items()}

    def specs(self) -> dict[str, TensorSpec]:
        """Every output tensor's shape and dtype, tied copies right after their original."""
        specs: dict[str, TensorSpec] = {}
        copies = self._copies
        for name in self.pre.names:
            entry = self.archive.entry(name)
            rows = self.info.rows.get(name, 0)
            shape = (entry.shape[0] + rows, *entry.shape[1:]) if rows else entry.shape
            specs[name] = TensorSpec(shape, self.info.dtype_of(entry))
            if name in copies:
                specs[copies[name]] = specs[name]
        return specs

    def check_pretrained(self) -> None:
        """Read the whole pretrained checkpoint once to compare its fingerprint."""
        if self.pre.fingerprint() != self.archive.header.pretrained_fingerprint:
            raise self._wrong_pretrained()

    def _wrong_pretrained(self) -> TvqError:
        return TvqError(
            f"{self.pre.path}: is not the pretrained checkpoint {self.archive.path} was packed "
            "from (fingerprints differ)"
        )

    def tensors(
        self, compare: TaskSource | None = None, stats: ErrorStats | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in `specs` order. With `compare`, the original fine-tune's task
        vectors are read alongside and the reconstruction's error added to `stats`."""
        copies = self._copies
        for name in self.pre.names:
            raw = self.pre.load(name)
            self._digests[name] = tensor_digest(name, raw)
            entry = self.archive.entry(name)
            if entry.kind == "shared":
                yield name, raw
                continue
            pre = raw.to(torch.float32)
            tau = torch.empty(entry.numel)
            task_vector_into(self.archive, self.task, name, pre, tau)
            tau = tau.view(entry.shape)
            if compare is not None:
                stats.add(compare.load_float(name) - pre, tau)
            where = f"{name} of task {self.task}"
            value = require_finite(pre.add_(tau), self.archive.path, where)
            dtype = self.info.dtype_of(entry)
            value = value.to(to_torch(dtype))
            if dtype == "F16":  # past fp16's range a value becomes Inf
                require_finite(value, self.archive.path, f"{where} in fp16")
            rows = self.archive.added_rows(self.task, name)
            if rows is not None:
                value = torch.cat([value, rows])
            yield name, value
            if name in copies:
                yield copies[name], value

    def check_streamed(self) -> None:
        """After `tensors`: the pretrained bytes read were the ones packed against."""
        if combine_digests(self._digests) != self.archive.header.pretrained_fingerprint:
            raise self._wrong_pretrained()

    def companions(self) -> tuple[dict[str, bytes], list[str]]:
        """The task's stored small files (else the pretrained folder's), config.json made true
        to the weights (dtype, vocabulary size); and notes."""
        notes = []
        files = {path: self.archive.task_file(self.task, path) for path in self.info.files}
        if not files and self.pre.path.is_dir():
            files = read_companions(self.pre.path).files
            notes.append(
                f"task {self.task} has no stored config or tokenizer (packed from a file, or by "
                f"an older tvq): took those of {self.pre.path}"
            )
        if CONFIG in files:
            dtype = self.info.dtype or _most_common_float(self.archive)
            vocab = {
                self.archive.entry(name).shape[0]: self.archive.entry(name).shape[0] + rows
                for name, rows in self.info.rows.items()
            }
            files[CONFIG] = fit_config(files[CONFIG], dtype, vocab)
        return files, notes


def _most_common_float(archive: Archive) -> str | None:
    counts: dict[str, int] = {}
    for entry in archive.header.tensors:
        if entry.kind != "shared":
            counts[entry.dtype] = counts.get(entry.dtype, 0) + entry.numel
    return max(counts, key=counts.__getitem__) if counts else None


def task_tensors(
    archive: Path | str | Archive, task: str, pretrained: Path | str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream one task's fine-tune, rebuilt: (name, tensor) pairs in the task's own dtypes and
    shapes (added rows included), one tensor in memory at a time. The pretrained checkpoint's
    fingerprint is checked first (one read of it), so no tensor of a wrong base is handed out.

        for name, tensor in tvq_cli.task_tensors("tasks.tvq", "math", "base/"):
            model_state[name].copy_(tensor)
    """
    opened = archive if isinstance(archive, Archive) else Archive(archive)
    pre = Checkpoint(pretrained)
    try:
        rebuild = Rebuild(opened, task, pre)
        rebuild.check_pretrained()
        yield from rebuild.tensors()
    finally:
        pre.close()
        if opened is not archive:
            opened.close()


def extract(
    archive: Path | str,
    task: str,
    pretrained: Path | str,
    out: Path | str,
    *,
    against: Path | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
) -> dict:
    """Write one task's fine-tune to `out`: a folder (weights, sharded past `max_shard_size`,
    with the task's config and tokenizer files), or a file ending in .safetensors (weights).

    `against`: the original fine-tune; it must be the one packed as `task` (its fingerprint is
    compared) and the report gives the reconstruction's error against it. Nothing is written
    unless every check passes. Returns the report (docs/cli.md).
    """
    start = time.perf_counter()
    out = Path(out)
    folder = out.suffix != ".safetensors"
    with usage_errors():
        max_shard = parse_size(max_shard_size)
    opened = Archive(archive)
    pre = Checkpoint(pretrained)
    original = None
    try:
        rebuild = Rebuild(opened, task, pre)
        original = open_task(against, pre) if against is not None else None
        inputs = [*opened.paths, *pre.files, *(original.files if original else [])]
        check_target(out, overwrite, inputs, folder)
        files, notes = rebuild.companions() if folder else ({}, [])
        stats = ErrorStats() if original else None
        with (
            claim_output(out, overwrite, inputs, folder),
            atomic_output(out, folder=folder, replace=overwrite) as staged,
        ):
            specs = rebuild.specs()
            writer = ModelWriter(staged, specs, folder=folder, max_shard_bytes=max_shard)
            behind = Writer()  # the previous tensor is written while the next one is rebuilt
            try:
                for name, tensor in rebuild.tensors(original, stats):
                    behind.submit(lambda name=name, tensor=tensor: writer.write(name, tensor))
                behind.wait()
                rebuild.check_streamed()
                fingerprint = _check_original(original, rebuild)
                writer.finish()
            except BaseException:
                behind.close()
                writer.abort()
                raise
            finally:
                behind.close()
            written = [out / f.relative_to(staged) for f in writer.files]
            written += [out / p.relative_to(staged) for p in write_companions(files, staged)]
    finally:
        pre.close()
        opened.close()
        if original is not None:
            original.close()
    report = {
        "task": task,
        "archive": str(opened.path),
        "output": {
            "path": str(out),
            "format": "folder" if folder else "safetensors",
            "files": [str(f) for f in written],
            "bytes": sum(f.stat().st_size for f in written),
            "dtype": rebuild.info.dtype,
        },
        "tensors": len(specs),
        "added_rows": rebuild.info.rows,
        "notes": notes,
        "seconds": time.perf_counter() - start,
    }
    if original is not None:
        report["against"] = {"path": str(against), "fingerprint": fingerprint, **stats.as_dict()}
    return report


def _check_original(original: TaskSource | None, rebuild: Rebuild) -> str | None:
    """Whether `original` is the fine-tune packed as the task: "match", or "not recorded" for
    an archive that records no fingerprint (format version 1); an error when it differs."""
    if original is None:
        return None
    header = rebuild.archive.header
    if task_fingerprint(header, rebuild.task) is None:
        return "not recorded"
    check_task_source(header, rebuild.task, original)
    return "match"
