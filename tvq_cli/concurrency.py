"""Threads shared by pack and merge: how many, torch's own thread team, an ordered writer.

Reading (pread) and writing (crc32, file writes) release the GIL, as do torch and numpy ops, so
reading, computing and writing overlap on separate cores. The writer runs at most one job behind
the caller, so peak memory does not grow with the number of tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import UsageError

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


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic garbage collection inside the block; one collection at its end.

    pack and merge make a few short-lived Python objects per block of work, and in a process
    that imported torch every generation-2 collection they trigger walks hundreds of
    thousands of objects: several percent of a merge's time (measured). They make no
    reference cycles that need the collector while they run.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect(0)


def default_threads() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> int:
    """`--threads`: default every core this process may use; at least 1."""
    if threads is None:
        return default_threads()
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    return threads


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Set torch's intra-op thread count for a block, and restore it after."""
    import torch  # here: the merge methods' locks come from this module, and need no torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class StateLock:
    """A lock guarding state that may be sent to another process: it pickles as a new,
    unlocked lock (a merge method's statistics go to Ray workers, `merge.distributed`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def __reduce__(self) -> tuple:
        return (StateLock, ())


class WorkerPool:
    """`threads` workers for the pieces of one tensor (blocks, tasks, parts); work runs in the
    caller's thread when there is one thread or one item."""

    def __init__(self, threads: int, name: str):
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name) if threads > 1 else None

    def map(self, fn: Callable, items: Iterable) -> list:
        """fn over items, in order; the first error is re-raised."""
        items = list(items)
        if self._pool is None or len(items) < 2:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


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
