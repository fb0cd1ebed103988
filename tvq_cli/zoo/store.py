"""Reading and writing zoo checkpoints: plain safetensors files in Hugging Face-style folders.

Loading never unpickles anything. A checkpoint may be given as a ``.safetensors`` file, as a
folder holding ``model.safetensors``, or as a sharded folder with
``model.safetensors.index.json`` (the layout ``save_pretrained`` writes for big models), so
merged or reconstructed models from any tool can be evaluated against the zoo. A folder whose
config.json declares compressed-tensors' ``pack-quantized`` format (``tvq merge --quantize``)
is dequantized on load, as transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import TvqError
from ..io.checkpoint import SINGLE_FILE as WEIGHTS_NAME
from ..io.checkpoint import Checkpoint
from ..quant import packed_int

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


def load_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint given as a file, a folder, or a sharded folder (zoo models are
    small, so loading them whole is fine here); packed weights come back dequantized."""
    ckpt = Checkpoint(checkpoint)
    state = {name: ckpt.load(name) for name in ckpt.names}
    config = Path(checkpoint) / CONFIG_NAME
    if config.is_file():
        quantization = read_json(config).get("quantization_config")
        if quantization is not None:
            return unpacked_state(state, quantization, config)
    return state


def unpacked_state(
    state: dict[str, torch.Tensor], quantization: dict, where: Path
) -> dict[str, torch.Tensor]:
    """A compressed-tensors `pack-quantized` state with every packed weight dequantized."""
    groups = quantization.get("config_groups") or {}
    if (
        quantization.get("quant_method") != "compressed-tensors"
        or quantization.get("format") != "pack-quantized"
        or len(groups) != 1
    ):
        raise TvqError(f"{where}: only pack-quantized folders with one config group are read")
    scheme = packed_int.scheme_of(next(iter(groups.values())).get("weights") or {})
    out = {}
    for name, tensor in state.items():
        module, _, suffix = name.rpartition(".")
        if suffix in ("weight_scale", "weight_shape", "weight_zero_point"):
            continue
        if suffix != "weight_packed":
            out[name] = tensor
            continue
        zero = state.get(f"{module}.weight_zero_point")
        try:
            shape = tuple(int(v) for v in state[f"{module}.weight_shape"].tolist())
            step = state[f"{module}.weight_scale"]
            weight = packed_int.dequantize_packed(tensor, step, zero, shape, scheme)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise TvqError(f"{where}: packed weight {module} does not unpack ({exc})") from None
        out[f"{module}.weight"] = weight
    return out


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
    state = load_state(path)
    if set(state) != {"weight", "bias"} or state["weight"].ndim != 2:
        raise TvqError(f"{path} is not a zoo head (expected 'weight' [C, D] and 'bias' [C])")
    n_classes, dim = state["weight"].shape
    head = torch.nn.Linear(dim, n_classes)
    head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    head.eval()
    return head
