"""Reading and writing zoo checkpoints: plain safetensors files in Hugging Face-style folders.

Loading never unpickles anything. A checkpoint may be given as a ``.safetensors`` file, as a
folder holding ``model.safetensors``, or as a sharded folder with
``model.safetensors.index.json`` (the layout ``save_pretrained`` writes for big models), so
merged or reconstructed models from any tool can be evaluated against the zoo.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import TvqError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def write_json(path: Path, obj: object) -> None:
    """Stable JSON (sorted keys, trailing newline) so equal content gives equal bytes."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TvqError(f"cannot read {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise TvqError(f"{path} does not hold a JSON object")
    return obj


def save_checkpoint(
    folder: Path, state: dict[str, torch.Tensor], config: dict[str, object]
) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json``; returns the weights path."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_NAME
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(weights), metadata={"format": "pt"}
    )
    write_json(folder / CONFIG_NAME, config)
    return weights


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise TvqError(f"cannot read safetensors file {path}: {exc}") from exc


def _load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise TvqError(f"{index_path} has no 'weight_map'")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / str(shard)
        if Path(str(shard)).is_absolute() or ".." in Path(str(shard)).parts:
            raise TvqError(f"{index_path} names a shard outside its folder: {shard!r}")
        for name, tensor in _load_file(shard_path).items():
            if weight_map.get(name) == shard:
                state[name] = tensor
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise TvqError(f"sharded checkpoint {index_path} lacks tensors {missing[:5]}")
    return state


def load_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint given as a file, a folder, or a sharded folder."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        if (checkpoint / WEIGHTS_NAME).is_file():
            return _load_file(checkpoint / WEIGHTS_NAME)
        if (checkpoint / INDEX_NAME).is_file():
            return _load_sharded(checkpoint / INDEX_NAME)
        raise TvqError(f"{checkpoint} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    if checkpoint.name.endswith(".index.json"):
        return _load_sharded(checkpoint)
    if not checkpoint.is_file():
        raise TvqError(f"no checkpoint at {checkpoint}")
    return _load_file(checkpoint)


def save_head(path: Path, head: torch.nn.Linear) -> None:
    """A task's classifier as ``weight``/``bias`` in its own small safetensors file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(torch.float32).contiguous().clone() for k, v in head.state_dict().items()
    }
    # One metadata key only: safetensors writes metadata in hash-map order, so several keys
    # would make otherwise identical files differ byte for byte between runs.
    save_file(state, str(path), metadata={"format": "pt"})


def load_head(path: Path) -> torch.nn.Linear:
    """The linear head stored at ``path``, ready for inference."""
    state = _load_file(path)
    if set(state) != {"weight", "bias"} or state["weight"].ndim != 2:
        raise TvqError(f"{path} is not a zoo head (expected 'weight' [C, D] and 'bias' [C])")
    n_classes, dim = state["weight"].shape
    head = torch.nn.Linear(dim, n_classes)
    head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    head.eval()
    return head
