"""Does each fine-tune given to `inspect --against` belong to its task?

Fine-tunes are matched to the archive's tasks by position, so a swapped order or a wrong file
would be measured as a large error (rel-L2 about 1.41 for unrelated task vectors) and look like
a bad archive. Where the archive records which fine-tune a task came from, that decides
(`archive.identity`); otherwise two checks on the measured vectors:

- the order: every decoded task vector is compared with every given fine-tune's, on a fixed
  sample of each tensor (the cost stays that of one task). For fine-tunes j and k, pairing
  them the other way round changes the summed squared error by
  ``2 (h_k - h_j) . (r_j - r_k)`` (h decoded, r given): each task's own quantization error
  cancels out, so the test holds for FQ too, whose error can be many times the task vector.
  In the right order the change is about ``+2 |r_j - r_k|^2``, swapped about ``-2 |r_j - r_k|^2``
  (a rotation of three about ``-1``); a pair is taken for swapped below ``-0.5``. Near-identical
  fine-tunes, whose order hardly matters, are not judged.
- the distance: a decoded task vector farther from the given fine-tune's than zero is (rel-L2
  above 1). Where the scheme rules it out (TVQ: every element lies between 0 and its true
  value) it is an error; for RTVQ a warning; FQ, whose error is the weights' and may well
  exceed the task vector at few bits, is not judged by it, nor are archives with low-rate
  parts (their norm-restoring gain may land a little farther than zero at a fraction of a
  bit per weight).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..archive.schemes import Scheme
from ..errors import TvqError, warn

SAMPLE = 4096  # elements per tensor compared across tasks
SWAP = 0.5  # a pair is swapped when pairing it crosswise lowers the error by this x distance
DISTINCT = 0.01  # fine-tunes closer than this (relative squared distance) are alike
TOLERANCE = 1e-3  # relative slack on "never farther than zero" for float32 rounding


class CrossMatch:
    """Running products between every task's decoded vector and every given fine-tune's true
    one, on a strided sample of each tensor."""

    def __init__(self, tasks: int):
        self.hat_ref = torch.zeros(tasks, tasks, dtype=torch.float64)
        self.ref_ref = torch.zeros(tasks, tasks, dtype=torch.float64)

    @staticmethod
    def sample(values: torch.Tensor) -> torch.Tensor:
        """The elements of one tensor that take part (the same ones for every task)."""
        flat = values.reshape(-1)
        return flat[:: max(1, flat.numel() // SAMPLE)].double()

    def add(self, decoded: list[torch.Tensor], given: list[torch.Tensor]) -> None:
        """One tensor's `sample`s: of the decoded task vectors and of the given fine-tunes'
        ones, in task order."""
        hat, ref = torch.stack(decoded), torch.stack(given)
        self.hat_ref += hat @ ref.T
        self.ref_ref += ref @ ref.T

    def swaps(self) -> list[tuple[int, int]]:
        """Pairs (j, k) of fine-tunes that fit each other's task better than their own."""
        hr, rr = self.hat_ref, self.ref_ref
        ref2 = rr.diagonal()
        found = []
        for j in range(len(ref2)):
            for k in range(j + 1, len(ref2)):
                apart = ref2[j] + ref2[k] - 2 * rr[j, k]
                if apart <= DISTINCT * (ref2[j] + ref2[k]) / 2:
                    continue
                gain = 2 * (hr[k, j] - hr[j, j] + hr[j, k] - hr[k, k])  # (h_k - h_j).(r_j - r_k)
                if gain > SWAP * apart:
                    found.append((j, k))
        return found


def check_order(tasks: list[str], paths: list[Path], cross: CrossMatch) -> None:
    """Raise when fine-tunes belong to other tasks than their position says."""
    swaps = cross.swaps()
    if swaps:
        pairs = "; ".join(
            f"{paths[j]} (given for task {tasks[j]!r}) and {paths[k]} (for {tasks[k]!r}) fit "
            "each other's task better than their own"
            for j, k in swaps
        )
        raise TvqError(
            f"the fine-tuned checkpoints are not in the archive's task order: {pairs}; give "
            f"them in the order {', '.join(tasks)}"
        )


def check_distance(
    task: str, path: Path, err2: float, ref2: float, scheme: Scheme, low_rate: bool = False
) -> None:
    """A decoded task vector farther from the fine-tune's than zero is: an error where the
    scheme rules it out, a warning where it is unlikely (module docstring)."""
    if not scheme.subtracts_pretrained or low_rate or err2 <= ref2 * (1 + TOLERANCE):
        return
    how_far = f"rel-L2 {(err2 / ref2) ** 0.5:.2f}" if ref2 > 0 else "its task vector is all zero"
    message = (
        f"{path} does not look like the fine-tune of task {task!r}: the archive's task vector "
        f"is farther from it than zero is ({how_far})"
    )
    if scheme.within_task_vector:
        raise TvqError(f"{message}; with a {scheme.name} archive that cannot happen")
    warn(f"{message}; is it the right file?")
