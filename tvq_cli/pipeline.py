"""Concurrency for `pack`: read ahead in one thread, compute in a pool, write in another.

Reading (pread, hashing the pretrained bytes) and writing (crc32, file writes) release the GIL,
as do torch and numpy ops, so the three stages overlap on separate cores. Every stage is bounded:
the reader stops when the tensors it holds (being processed or waiting) would pass a byte
budget, and at most one tensor's outputs wait for the writer, so peak memory does not grow with
the number of tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .archive.format import ITEMSIZE, TensorEntry
from .checkpoint import Checkpoint, tensor_digest

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def fixed_mmap_threshold(limit: int = 1 << 20) -> None:
    """Have glibc give every allocation over `limit` its own mapping, returned when freed.

    By default glibc raises this threshold after the first large free (up to 32 MiB); from then
    on multi-megabyte tensor buffers come from per-thread heaps, which fragment, so peak memory
    grew with the number of tensors (measured: +38 MiB for twice the tensors, 0 with this).
    Setting it once also stops the adjustment. No effect where the C library is not glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, limit)


def default_threads() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Set torch's intra-op thread count for a block, and restore it after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TensorInputs:
    """The raw (stored-dtype) values of one tensor in every input, and its fingerprint digest."""

    entry: TensorEntry
    pretrained: torch.Tensor
    finetuned: list[torch.Tensor]
    digest: bytes
    nbytes: int


def _input_bytes(entry: TensorEntry, models: int) -> int:
    return entry.numel * ITEMSIZE[entry.dtype] * models


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
                pre = self._pretrained.load(entry.name)
                digest = tensor_digest(entry.name, pre)
                fts = [ckpt.load(entry.name) for ckpt in self._finetuned]
                self._ready.put(TensorInputs(entry, pre, fts, digest, size))
        except BaseException as exc:  # handed to the consumer, raised there
            self._ready.put(exc)

    def __iter__(self) -> Iterator[TensorInputs]:
        for _ in self._entries:
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, item: TensorInputs) -> None:
        """The consumer is done with `item`: its bytes no longer count against the budget."""
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


class Writer:
    """Runs write jobs in order on one background thread, at most one job behind the caller."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tvq-write")
        self._pending: Future | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._pool.submit(job)

    def wait(self) -> None:
        """Block until the pending job is done; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
