"""Reading ahead for pack: each tensor of every input, in a background thread, within a budget.

The reader stops when the tensors it holds (being processed or waiting) would pass a byte
budget, so peak memory does not grow with the number of tensors; reading (pread, hashing the
pretrained bytes) releases the GIL and overlaps the quantization of the tensor before. Read
buffers are reused for later tensors of the same size (`io.buffers`), within the same budget.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..archive.format import TensorEntry
from ..dtypes import itemsize
from ..io.buffers import BufferPool
from ..io.checkpoint import Checkpoint, tensor_digest
from ..io.task_source import TaskSource


@dataclass
class TensorInputs:
    """The raw (stored-dtype) values of one tensor in every input, in the pretrained shape;
    the rows each fine-tune added past it (None: none); and the pretrained tensor's digest.
    Empty for a tensor the reader skips."""

    entry: TensorEntry
    pretrained: torch.Tensor
    finetuned: list[torch.Tensor]
    added: list[torch.Tensor | None]
    paths: list[Path]
    digest: bytes
    nbytes: int
    buffers: list[torch.Tensor]  # the pool's buffers they were read into (`release`)


def _input_bytes(entry: TensorEntry, models: int) -> int:
    return entry.numel * itemsize(entry.dtype) * models


class Prefetcher:
    """Reads each tensor of every input in a background thread, in order, ahead of its use.

    It holds at most `budget` bytes of inputs (the tensor in use included) but always at least
    one tensor, so one tensor is read while the one before it is quantized.
    """

    def __init__(
        self,
        entries: list[TensorEntry],
        pretrained: Checkpoint,
        finetuned: list[TaskSource],
        budget: int,
        skip: frozenset[str] = frozenset(),
    ):
        self._entries = entries
        self._skip = skip  # tensors read elsewhere (`rows.py`): handed out unread
        self._pretrained = pretrained
        self._finetuned = finetuned
        self._budget = budget
        self._buffers = BufferPool(budget)
        self._held = 0
        self._room = threading.Condition()
        self._ready: queue.Queue = queue.Queue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tvq-read", daemon=True)

    def start(self) -> None:
        """Start reading; call `close` in every case afterwards (register it first)."""
        self._thread.start()

    def _run(self) -> None:
        models = 1 + len(self._finetuned)
        try:
            for entry in self._entries:
                if entry.name in self._skip:
                    self._ready.put(TensorInputs(entry, torch.empty(0), [], [], [], b"", 0, []))
                    continue
                size = _input_bytes(entry, models)
                with self._room:
                    while self._held and self._held + size > self._budget and not self._stop:
                        self._room.wait()
                    if self._stop:
                        return
                    self._held += size
                buffers = [self._buffers.take(self._pretrained.specs[entry.name].nbytes)]
                pre = self._pretrained.load(entry.name, buffers[0])
                digest = tensor_digest(entry.name, pre)
                fts, added = [], []
                for source in self._finetuned:
                    nbytes = source.stored_nbytes(entry.name)
                    buffer = None if nbytes is None else self._buffers.take(nbytes)
                    if buffer is not None:
                        buffers.append(buffer)
                    full = source.load_full(entry.name, buffer)
                    shared_rows, new_rows = source.split(entry.name, full)
                    fts.append(shared_rows)
                    added.append(new_rows)
                paths = [source.path for source in self._finetuned]
                item = TensorInputs(entry, pre, fts, added, paths, digest, size, buffers)
                self._ready.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            self._ready.put(exc)

    def __iter__(self) -> Iterator[TensorInputs]:
        for _ in self._entries:
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, item: TensorInputs) -> None:
        """The consumer is done with `item`: its bytes no longer count against the budget,
        and its buffers are read into again, so nothing may still refer to its tensors."""
        for source in self._finetuned:
            source.settle()  # no hash may still be reading a buffer given back
        for buffer in item.buffers:
            self._buffers.give(buffer)
        item.buffers = []
        item.pretrained = torch.empty(0)
        item.finetuned = []
        item.added = []
        with self._room:
            self._held -= item.nbytes
            self._room.notify()

    def close(self) -> None:
        """Stop the reader and wait for it: a thread left inside torch when the interpreter
        exits aborts the process."""
        with self._room:
            self._stop = True
            self._room.notify()
        if self._thread.ident is not None:
            self._thread.join()
