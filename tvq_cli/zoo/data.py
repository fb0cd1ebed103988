"""The digits data behind the example zoo: loading, the tasks, fixed splits, augmentation.

Every image is seen "in the wild": shifted by up to one pixel in each direction. That small
jitter is what makes the zoo behave like real fine-tuning: a linear probe on frozen features
copes badly with it while a fine-tuned network learns to, so fine-tunes clearly beat the
pretrained backbone. The tasks are different labelings of the same digits (digit, parity,
mod 3, ...), so their task vectors share a useful component and task arithmetic helps.

Everything here is pure numpy; the train/test split and the test-set jitter are fixed by
``data_seed`` so the builder and the evaluator always see the same held-out images.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

N_PIXELS = 64
SIDE = 8
N_DIGITS = 10
N_SAMPLES = 1797
TEST_FRACTION = 0.35
"""Share of every digit class held out for testing (the same images for every task)."""
JITTER = 1
"""Largest random shift, in pixels, applied to every image along each axis."""
DEFAULT_DATA_SEED = 20240607
PRETRAIN_DIGITS = 4
"""The backbone is pretrained on digits 0..3 only; every task also needs digits 4..9."""


@dataclass(frozen=True)
class TaskSpec:
    """A zoo task: a labeling of the ten digits, with its own classification head."""

    name: str
    description: str
    labels: tuple[int, ...]  # label of digit 0, 1, ..., 9

    @property
    def n_classes(self) -> int:
        return max(self.labels) + 1

    def relabel(self, digits: np.ndarray) -> np.ndarray:
        return np.asarray(self.labels, dtype=np.int64)[digits]


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("digit", "which digit (10 classes)", (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)),
        TaskSpec("parity", "odd or even", (0, 1, 0, 1, 0, 1, 0, 1, 0, 1)),
        TaskSpec("mod3", "digit modulo 3", (0, 1, 2, 0, 1, 2, 0, 1, 2, 0)),
        TaskSpec("div3", "digit // 3 (4 classes)", (0, 0, 0, 1, 1, 1, 2, 2, 2, 3)),
        TaskSpec("prime", "digit is prime (2, 3, 5, 7)", (0, 0, 1, 1, 0, 1, 0, 1, 0, 0)),
        TaskSpec("loops", "closed loops drawn (0, 1 or 2)", (1, 0, 0, 0, 1, 0, 1, 0, 2, 1)),
        TaskSpec("mod4", "digit modulo 4", (0, 1, 2, 3, 0, 1, 2, 3, 0, 1)),
        TaskSpec("half", "digit // 2 (5 classes)", (0, 0, 1, 1, 2, 2, 3, 3, 4, 4)),
    )
}
"""The zoo's tasks, in the zoo's order."""


@dataclass(frozen=True)
class Split:
    """Images as float32 in [0, 1] (shape ``(n, 64)``) and int64 labels."""

    x: np.ndarray
    y: np.ndarray


@lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """Read the bundled ``digits.csv.gz`` (64 pixels 0..16, then the label) once."""
    ref = resources.files(__package__).joinpath("data").joinpath("digits.csv.gz")
    with ref.open("rb") as fh, gzip.open(fh, "rt") as text:
        arr = np.loadtxt(text, delimiter=",", dtype=np.float64)
    if arr.shape != (N_SAMPLES, N_PIXELS + 1):
        raise ValueError(f"unexpected digits data shape {arr.shape}")
    x = (arr[:, :N_PIXELS] / 16.0).astype(np.float32)
    y = arr[:, N_PIXELS].astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: images in [0, 1] as ``(1797, 64)`` float32, digit labels ``(1797,)``."""
    x, y = _load_raw()
    return x.copy(), y.copy()


@lru_cache(maxsize=4)
def split_indices(data_seed: int = DEFAULT_DATA_SEED) -> tuple[np.ndarray, np.ndarray]:
    """A stratified train/test split of the digit indices, fixed by ``data_seed``."""
    _, y = _load_raw()
    rng = np.random.default_rng(data_seed)
    train, test = [], []
    for c in range(N_DIGITS):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * TEST_FRACTION))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def jitter(x: np.ndarray, rng: np.random.Generator, max_shift: int = JITTER) -> np.ndarray:
    """Shift each image by its own random offset in ``[-max_shift, max_shift]`` per axis."""
    img = x.reshape(-1, SIDE, SIDE)
    n = img.shape[0]
    dy = rng.integers(-max_shift, max_shift + 1, size=n)
    dx = rng.integers(-max_shift, max_shift + 1, size=n)
    k = max_shift
    pad = np.pad(img, ((0, 0), (k, k), (k, k)))
    # Gather the shifted 8x8 window of every image at once.
    rows = (k - dy)[:, None] + np.arange(SIDE)[None, :]
    cols = (k - dx)[:, None] + np.arange(SIDE)[None, :]
    out = pad[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return np.ascontiguousarray(out.reshape(n, N_PIXELS), dtype=np.float32)


def _task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown zoo task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def train_images(data_seed: int = DEFAULT_DATA_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The clean (un-jittered) training images and their digits; trainers jitter per epoch."""
    x, y = _load_raw()
    train_idx, _ = split_indices(data_seed)
    return x[train_idx].copy(), y[train_idx].copy()


@lru_cache(maxsize=4)
def _heldout_images(data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _load_raw()
    _, test_idx = split_indices(data_seed)
    xt = jitter(x[test_idx], np.random.default_rng([data_seed, 1]))
    xt.setflags(write=False)
    return xt, y[test_idx]


def heldout_split(name: str, data_seed: int = DEFAULT_DATA_SEED) -> Split:
    """A task's held-out test split: fixed jittered test images, labeled for that task."""
    xt, digits = _heldout_images(data_seed)
    return Split(xt.copy(), _task(name).relabel(digits))


def pretrain_split(data_seed: int = DEFAULT_DATA_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Clean training images of digits ``0..PRETRAIN_DIGITS-1`` (never a test image)."""
    x, y = train_images(data_seed)
    keep = y < PRETRAIN_DIGITS
    return x[keep], y[keep]


def epoch_batches(
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] = jitter,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch of freshly jittered, shuffled minibatches (numpy, so torch RNG is untouched)."""
    xa = augment(x, rng)
    order = rng.permutation(len(xa))
    return [
        (xa[order[i : i + batch_size]], y[order[i : i + batch_size]])
        for i in range(0, len(xa), batch_size)
    ]
