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

import torch

from ..archive.format import TensorEntry
from ..dtypes import itemsize
from ..io.buffers import BufferPool
from ..io.checkpoint import Checkpoint, tensor_digest


@dataclass
class TensorInputs:
    """The raw (stored-dtype) values of one tensor in every input, and its fingerprint digest."""

    entry: TensorEntry
    pretrained: torch.Tensor
    finetuned: list[torch.Tensor]
    digest: bytes
    nbytes: int


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
        finetuned: list[Checkpoint],
        budget: int,
    ):
        self._entries = entries
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
                size = _input_bytes(entry, models)
                with self._room:
                    while self._held and self._held + size > self._budget and not self._stop:
                        self._room.wait()
                    if self._stop:
                        return
                    self._held += size
                pre = self._load(self._pretrained, entry.name)
                digest = tensor_digest(entry.name, pre)
                fts = [self._load(ckpt, entry.name) for ckpt in self._finetuned]
                self._ready.put(TensorInputs(entry, pre, fts, digest, size))
        except BaseException as exc:  # handed to the consumer, raised there
            self._ready.put(exc)

    def __iter__(self) -> Iterator[TensorInputs]:
        for _ in self._entries:
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def _load(self, checkpoint: Checkpoint, name: str) -> torch.Tensor:
        """One tensor, read into a buffer of the pool (given back by `release`)."""
        return checkpoint.load(name, self._buffers.take(checkpoint.specs[name].nbytes))

    def release(self, item: TensorInputs) -> None:
        """The consumer is done with `item`: its bytes no longer count against the budget,
        and its buffers are read into again, so nothing may still refer to its tensors."""
        for raw in (item.pretrained, *item.finetuned):
            self._buffers.give(raw.reshape(-1).view(torch.uint8))
        item.pretrained = torch.empty(0)
        item.finetuned = []
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
