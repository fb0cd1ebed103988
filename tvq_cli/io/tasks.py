"""Opening fine-tunes in whatever form they come: a model checkpoint or a LoRA adapter."""

from __future__ import annotations

from pathlib import Path

from ..errors import TvqError
from .checkpoint import Checkpoint
from .lora import ADAPTER_CONFIG, LoraTask
from .task_source import CheckpointTask, TaskSource


def open_task(path: Path | str, pretrained: Checkpoint) -> TaskSource:
    """A fine-tune at `path`: a PEFT LoRA adapter folder, or a model checkpoint."""
    path = Path(path)
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        return LoraTask(path, pretrained)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        adapters = sorted(p.parent.name for p in path.glob(f"*/{ADAPTER_CONFIG}"))
        if adapters:
            raise TvqError(
                f"{path}: holds the PEFT adapters {', '.join(adapters)} in subfolders: give one "
                f"of them, e.g. {path / adapters[0]}"
            )
    return CheckpointTask(path, pretrained)


def open_tasks(paths: list[Path], pretrained: Checkpoint) -> list[TaskSource]:
    """Every fine-tune, opened and matched; those opened so far are closed on an error."""
    sources: list[TaskSource] = []
    try:
        for path in paths:
            sources.append(open_task(path, pretrained))
    except BaseException:
        for source in sources:
            source.close()
        raise
    return sources
