"""Exact k-th smallest |x| over a whole model, streamed tensor by tensor in two passes.

For non-negative float32 values the IEEE bit pattern, read as an integer, orders exactly like
the value. Pass 1 counts values by the high 16 bits of their pattern (65,536 bins) and finds
the bin that holds the k-th smallest; pass 2 counts, inside that bin only, by the low 16 bits.
The two bins name the exact bit pattern of the k-th smallest value: the same threshold
`torch.kthvalue` would give on the flattened model, with 2 x 65,536 counters of memory.
Counts add up in any order, so blocks of a tensor may be observed from several threads; with the
native kernels each thread counts into its own table (one pass over the values, no full-size
temporaries), added up when the pass ends.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..concurrency import StateLock
from ..quant import native

BINS = 1 << 16


def _patterns(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).to(torch.float32).abs().view(torch.int32)


class StreamingKth:
    """The k-th smallest |x| (1-based) of every value seen, exact, in two streaming passes."""

    def __init__(self) -> None:
        self.count = 0
        self._high = torch.zeros(BINS, dtype=torch.int64)
        self._low = torch.zeros(BINS, dtype=torch.int64)
        self._bin: int | None = None
        self._rank = 0
        self._lock = StateLock()
        self._tables: dict[int, np.ndarray] = {}  # per thread, native counting only

    def _table(self) -> np.ndarray:
        """This thread's own counts (added into the pass's counts by `_gather`)."""
        key = threading.get_ident()
        table = self._tables.get(key)
        if table is None:
            with self._lock:
                table = self._tables[key] = np.zeros(BINS, np.int64)
        return table

    def _gather(self, into: torch.Tensor) -> None:
        for table in self._tables.values():
            into += torch.from_numpy(table)
        self._tables = {}

    def _counted(self, x, bin: int) -> bool:
        """Count `x` natively into this thread's table (from its codes where it offers to:
        `stream.TaskColumns`); False where the kernels cannot."""
        if not isinstance(x, torch.Tensor):
            return x.count_magnitudes(bin, self._table())
        if native.lib is None or x.dtype != torch.float32 or not x.is_contiguous():
            return False
        native.lib.histogram(x.detach().reshape(-1).numpy(), bin, self._table())
        return True

    def observe_high(self, x) -> None:
        """Pass 1: count the values of one tensor (or `stream.TaskColumns`) by the high half
        of their bit pattern."""
        if self._counted(x, -1):
            with self._lock:
                self.count += x.numel()
            return
        x = x if isinstance(x, torch.Tensor) else x.values()
        bits = _patterns(x)
        counts = torch.bincount(bits >> 16, minlength=BINS)
        with self._lock:
            self.count += bits.numel()
            self._high += counts

    def select(self, k: int) -> None:
        """After pass 1: fix the rank k (1 <= k <= count) to find."""
        self._gather(self._high)
        if not 1 <= k <= self.count:
            raise ValueError(f"rank {k} out of range for {self.count} values")
        cumulative = torch.cumsum(self._high, 0)
        self._bin = int(torch.searchsorted(cumulative, k))
        before = int(cumulative[self._bin - 1]) if self._bin > 0 else 0
        self._rank = k - before

    def observe_low(self, x) -> None:
        """Pass 2: count, inside the selected high bin, by the low half of the bit pattern."""
        if self._counted(x, self._bin):
            return
        x = x if isinstance(x, torch.Tensor) else x.values()
        bits = _patterns(x)
        inside = bits[(bits >> 16) == self._bin] & 0xFFFF
        if inside.numel():
            counts = torch.bincount(inside, minlength=BINS)
            with self._lock:
                self._low += counts

    def value(self) -> float:
        """After pass 2: the exact k-th smallest |x|."""
        self._gather(self._low)
        low = int(torch.searchsorted(torch.cumsum(self._low, 0), self._rank))
        pattern = torch.tensor([(self._bin << 16) | low], dtype=torch.int32)
        return float(pattern.view(torch.float32)[0])
