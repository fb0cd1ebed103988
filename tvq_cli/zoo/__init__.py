"""An example model zoo: a small pretrained backbone and eight real fine-tunes of it.

Built offline from the bundled scikit-learn ``digits`` data in a few seconds, deterministically,
as ordinary safetensors checkpoints. It gives the project real task vectors to compress and
merge, and an evaluator that turns any reconstructed checkpoint into per-task accuracy.
"""

from __future__ import annotations

from .build import build_zoo
from .data import TASKS
from .evaluate import evaluate, evaluate_state, mean_accuracy
from .layout import Zoo
from .merge import task_arithmetic, task_arithmetic_fp32

__all__ = [
    "TASKS",
    "Zoo",
    "build_zoo",
    "evaluate",
    "evaluate_state",
    "mean_accuracy",
    "task_arithmetic",
    "task_arithmetic_fp32",
]
