"""Where a zoo keeps its files, and the ``Zoo`` handle that points at them.

Layout (Hugging Face style, one folder per model)::

    ZOO/zoo.json                       manifest: tasks, seeds, architecture, accuracies
    ZOO/pretrained/model.safetensors   the pretrained backbone (+ config.json)
    ZOO/<task>/model.safetensors       one fine-tuned backbone per task (+ config.json)
    ZOO/heads/<task>.safetensors       the task's classifier (not part of any backbone)

The manifest is written last, so a folder with a valid ``zoo.json`` is a complete zoo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TvqError
from .store import WEIGHTS_NAME, read_json

MANIFEST_NAME = "zoo.json"
ZOO_FORMAT = "tvq-zoo"
ZOO_VERSION = 1
"""Bump whenever data, tasks or training change, so old zoos on disk get rebuilt."""
PRETRAINED_DIR = "pretrained"
HEADS_DIR = "heads"


@dataclass(frozen=True)
class Zoo:
    """A built zoo on disk. ``pretrained`` and ``tasks`` are ``model.safetensors`` file paths."""

    root: Path
    pretrained: Path
    tasks: dict[str, Path]
    heads_dir: Path
    seed: int = 0
    manifest: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def head_path(self, task: str) -> Path:
        return self.heads_dir / f"{task}.safetensors"

    @classmethod
    def load(cls, root: Path) -> Zoo:
        """Open an existing zoo folder, checking that every file the manifest names exists."""
        root = Path(root)
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise TvqError(f"{root} is not a model zoo (no {MANIFEST_NAME})")
        manifest = read_json(manifest_path)
        if manifest.get("format") != ZOO_FORMAT:
            raise TvqError(f"{manifest_path} is not a {ZOO_FORMAT} manifest")
        names = [t["name"] for t in manifest.get("tasks", [])]
        zoo = cls(
            root=root,
            pretrained=root / PRETRAINED_DIR / WEIGHTS_NAME,
            tasks={name: root / name / WEIGHTS_NAME for name in names},
            heads_dir=root / HEADS_DIR,
            seed=int(manifest.get("seed", 0)),
            manifest=manifest,
        )
        missing = [p for p in zoo.all_files() if not p.is_file()]
        if missing:
            raise TvqError(f"zoo at {root} is incomplete: missing {missing[0]}")
        return zoo

    def all_files(self) -> list[Path]:
        """Every weights file of the zoo (backbones and heads)."""
        return [self.pretrained, *self.tasks.values(), *map(self.head_path, self.tasks)]


def is_current(root: Path, seed: int) -> bool:
    """Whether ``root`` already holds a complete zoo of this version built with ``seed``."""
    try:
        zoo = Zoo.load(root)
    except TvqError:
        return False
    return zoo.manifest.get("version") == ZOO_VERSION and zoo.seed == seed
