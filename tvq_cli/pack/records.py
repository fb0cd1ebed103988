"""What an archive records of each task's original checkpoint (`TaskInfo`), and the small
files it keeps for it (config, tokenizer, ...), each distinct file stored once."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from ..archive.format import FileBlob, TaskInfo
from ..io.task_source import TaskSource
from ..quant import entropy

FINGERPRINT_PLACEHOLDER = "sha256:" + "0" * 64  # as long as a real one: the header's size holds


@dataclass
class StoredFiles:
    """Distinct small files by sha256: their header entries and zstd frames."""

    blobs: dict[str, FileBlob] = field(default_factory=dict)
    frames: dict[str, bytes] = field(default_factory=dict)

    def add(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if sha not in self.blobs:
            frame = entropy.compress(data)
            self.blobs[sha] = FileBlob(len(data), len(frame))
            self.frames[sha] = frame
        return sha


def task_info(source: TaskSource, files: StoredFiles) -> tuple[TaskInfo, list[str]]:
    """A task's record (fingerprint still a placeholder) and notes on files left out."""
    dtypes = source.dtypes
    weight = Counter()
    for name, dtype in dtypes.items():
        weight[dtype] += source.specs[name].numel
    dtype = max(sorted(weight), key=weight.__getitem__) if weight else None
    companions = source.companions()
    notes = [f"{source.path}: left out {skipped}" for skipped in companions.skipped]
    info = TaskInfo(
        source=source.kind,
        fingerprint=FINGERPRINT_PLACEHOLDER,
        dtype=dtype,
        dtypes={n: d for n, d in dtypes.items() if d != dtype},
        rows=dict(source.rows),
        copies=dict(source.copies),
        absent=list(source.absent),
        renamed=(source.renamed.strip, source.renamed.add) if source.renamed else None,
        files={path: files.add(data) for path, data in sorted(companions.files.items())},
    )
    return info, notes
