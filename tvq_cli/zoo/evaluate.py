"""Scoring any backbone against the zoo: per-task test accuracy, each task with its own head.

This is how the project checks that a reconstructed or merged checkpoint still *works*, not
just that its numbers are close: quantization error that looks small can still cost accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import TvqError, UsageError
from .data import DEFAULT_DATA_SEED, heldout_split
from .layout import Zoo
from .model import Backbone, BackboneConfig, load_backbone
from .store import load_head, load_state


def accuracy(model: Backbone, head: torch.nn.Linear, task: str, data_seed: int) -> float:
    """Percent of the task's held-out test images that ``head(model(x))`` gets right."""
    split = heldout_split(task, data_seed)
    with torch.no_grad():
        pred = head(model(torch.from_numpy(split.x))).argmax(dim=1).numpy()
    return float((pred == split.y).mean() * 100.0)


def _select(zoo: Zoo, tasks: list[str] | None) -> list[str]:
    if tasks is None:
        return zoo.task_names
    unknown = [t for t in tasks if t not in zoo.tasks]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; the zoo has {zoo.task_names}")
    return list(tasks)


def evaluate_state(
    state: Mapping[str, torch.Tensor], zoo: Zoo | Path, tasks: list[str] | None = None
) -> dict[str, float]:
    """Per-task accuracy (percent) of in-memory backbone weights, e.g. a merge."""
    zoo = zoo if isinstance(zoo, Zoo) else Zoo.load(Path(zoo))
    config = BackboneConfig.from_dict(zoo.manifest["architecture"])
    data_seed = int(zoo.manifest.get("data_seed", DEFAULT_DATA_SEED))
    model = load_backbone(config, dict(state))
    return {
        t: accuracy(model, load_head(zoo.head_path(t)), t, data_seed) for t in _select(zoo, tasks)
    }


def evaluate(
    checkpoint: Path, zoo_root: Path | Zoo, tasks: list[str] | None = None
) -> dict[str, float]:
    """Per-task accuracy (percent) of a backbone checkpoint: file, folder or sharded folder."""
    return evaluate_state(load_state(Path(checkpoint)), zoo_root, tasks)


def mean_accuracy(accuracies: Mapping[str, float]) -> float:
    """Unweighted mean over tasks, the usual headline number for merged models."""
    if not accuracies:
        raise TvqError("no accuracies to average")
    return sum(accuracies.values()) / len(accuracies)
