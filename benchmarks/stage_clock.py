"""CPU time per stage, shared by the profile scripts (profile_pack.py, profile_merge.py)."""

from __future__ import annotations

import time
from collections import defaultdict


class Clock:
    """Adds the CPU time of this thread in each `with clock("stage"):` block to that stage:
    CPU time, since other jobs on a shared machine slow it down less than wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stage = ""

    def __call__(self, stage: str) -> Clock:
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._start = time.thread_time()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self._stage] += time.thread_time() - self._start
