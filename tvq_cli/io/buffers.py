"""Reusing read buffers between tensors of the same size, within a byte budget.

A freshly allocated multi-megabyte buffer costs a page fault per 4 KiB (and, where the page
cache is full or a VM hands free memory back to its host, much more: pack spent more CPU time in
the kernel providing fresh pages for its reads than in quantizing them). Checkpoints repeat the
same shapes layer after layer, so a buffer given back after one tensor is usually the right size
for a later one. The pool keeps given-back buffers only while the bytes it holds and the bytes
in use stay within its budget, so memory stays within what fresh buffers would have used.
"""

from __future__ import annotations

import threading

import torch


class BufferPool:
    """uint8 buffers for tensors read from checkpoints; thread-safe."""

    def __init__(self, budget: int):
        self.budget = budget
        self._free: dict[int, list[torch.Tensor]] = {}
        self._kept = 0  # bytes of the free buffers
        self._used = 0  # bytes handed out and not given back
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of exactly `nbytes` bytes: a given-back one where there is one."""
        with self._lock:
            self._used += nbytes
            free = self._free.get(nbytes)
            if free:
                self._kept -= nbytes
                return free.pop()
            self._trim(0)
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        """Give back a buffer from `take` (the caller no longer uses it or any view of it)."""
        nbytes = buffer.numel()
        with self._lock:
            self._used -= nbytes
            self._trim(nbytes)
            if self._used + self._kept + nbytes <= self.budget:
                self._free.setdefault(nbytes, []).append(buffer)
                self._kept += nbytes

    def _trim(self, room: int) -> None:
        """Drop free buffers, largest first, until `room` more bytes fit in the budget."""
        for size in sorted(self._free, reverse=True):
            buffers = self._free[size]
            while buffers and self._used + self._kept + room > self.budget:
                buffers.pop()
                self._kept -= size
        self._free = {size: b for size, b in self._free.items() if b}
