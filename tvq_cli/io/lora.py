"""PEFT LoRA adapter folders as fine-tunes: the weights peft's `merge_and_unload` would give.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module>.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]) (an
adapter name may sit between `lora_A` and `weight` in memory; peft removes it on save). For
module m, with peft's conventions (peft/tuners/lora/layer.py):

    r_m, alpha_m = rank_pattern / alpha_pattern entry matching m, else r, lora_alpha
    scaling      = alpha_m / sqrt(r_m) if use_rslora else alpha_m / r_m
    Linear       W' = W + (B @ A) * scaling            ([out, in])
    Conv1D       W' = W + ((B @ A) * scaling).T        (fan_in_fan_out: W is [in, out])
    Embedding    W' = W + (B_emb @ A_emb).T * scaling  (lora_embedding_A/B)
    lora_bias    b' = b + lora_B.bias * scaling
    DoRA         V = W + delta (as [out, in]); W' = (m / ||V||_row) * V
                 (lora_magnitude_vector m; the norm of each output row)

Tensors saved whole (modules_to_save, embedding layers of a resized vocabulary, saved as
`<module>.weight` or `<module>.base_layer.weight`) replace the pretrained tensor, and
`trainable_token_indices` rows (`token_adapter.trainable_tokens_delta`) are the new values of
those rows. Adapter types whose merge is not an addition of this kind are refused by name.
The weights are fp32 (the pretrained tensor plus the delta) in the pretrained dtype's stead:
the task's original dtype is the pretrained model's, as a merged adapter's would be.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..errors import TvqError
from .checkpoint import Checkpoint, TensorSpec
from .compat import check_tensor
from .model_files import TOKENIZER_FILES, Companions, read_companions
from .names import examples, find_renaming
from .task_source import TaskSource

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WRAPPER_PREFIX = "base_model.model."
ROLES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
TOKENS_SUFFIX = re.compile(r"^(.*)\.token_adapter\.trainable_tokens_delta(\.[^.]+)?$")
WHOLE_WRAPPERS = re.compile(r"\.(base_layer|modules_to_save\.[^.]+)\.")
# initialisations that change the base weights the adapter was trained against
MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class LoraTask(TaskSource):
    """A PEFT LoRA adapter, read as the pretrained model with the adapter merged."""

    kind = "lora"

    def __init__(self, path: Path, pretrained: Checkpoint):
        super().__init__(path, pretrained)
        self.config = _read_config(self.path)
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = (self.path / "adapter_model.bin").is_file()
            raise TvqError(
                f"{self.path}: has no {ADAPTER_WEIGHTS}"
                + (
                    " (adapter_model.bin is a pickle, which tvq does not load: save the adapter "
                    "with safe_serialization=True)"
                    if pickled
                    else ""
                )
            )
        self.adapter = Checkpoint(weights)
        self.files = [weights, self.path / ADAPTER_CONFIG]
        self._parse()

    # --- reading the adapter's keys -------------------------------------------------------
    def _keys(self) -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, str]]:
        """The adapter's keys by kind: LoRA modules (module path -> {"lora_A.weight": key,
        ...}), whole tensors (tensor name -> key) and trainable rows (module path -> key)."""
        modules: dict[str, dict[str, str]] = {}
        whole: dict[str, str] = {}
        tokens: dict[str, str] = {}
        adapters: set[str] = set()
        for key in self.adapter.names:
            name = key.removeprefix(WRAPPER_PREFIX)
            token = TOKENS_SUFFIX.match(name)
            parts = name.split(".")
            role = next((i for i, p in enumerate(parts) if p in ROLES), None)
            if token:
                tokens[token.group(1)] = key
            elif role is not None:
                rest = parts[role + 1 :]  # [adapter name] [weight | bias]
                leaf = rest.pop() if rest and rest[-1] in ("weight", "bias") else "weight"
                adapters.update(rest)
                module = ".".join(parts[:role])
                modules.setdefault(module, {})[f"{parts[role]}.{leaf}"] = key
            else:
                whole[WHOLE_WRAPPERS.sub(".", "." + name)[1:]] = key
        if len(adapters) > 1:
            raise TvqError(f"{self.path}: holds several adapters ({', '.join(sorted(adapters))})")
        return modules, whole, tokens

    def _parse(self) -> None:
        modules, whole, tokens = self._keys()
        # every name the adapter changes, in its own naming, mapped onto the pretrained names
        targets = {f"{m}.weight" for m in modules} | {f"{m}.weight" for m in tokens}
        targets |= {f"{m}.bias" for m, g in modules.items() if "lora_B.bias" in g}
        targets |= set(whole)
        base = self.pretrained.specs
        renamed = find_renaming(targets, base)
        for name in [n for n in whole if renamed(n) not in base]:  # a tied tensor saved twice
            original = self._copy_of(name, whole, renamed)
            if original is not None:
                self.copies[renamed(name)] = original
                targets.discard(name)
                del whole[name]
        unknown = [t for t in targets if renamed(t) not in base]
        if unknown:
            raise TvqError(
                f"{self.path}: the adapter changes {len(unknown)} tensors the pretrained "
                f"checkpoint does not have ({examples(unknown)}): an adapter of another model?"
            )
        self.renamed = renamed
        self._modules = {renamed(m + ".weight"): (m, g) for m, g in modules.items()}
        self._whole = {renamed(n): k for n, k in whole.items()}
        self._tokens = {renamed(m + ".weight"): (m, k) for m, k in tokens.items()}
        self._biases = {
            renamed(m + ".bias"): (m, g["lora_B.bias"])
            for m, g in modules.items()
            if "lora_B.bias" in g
        }
        for module, group in self._modules.values():
            self._check_module(module, group)
        self.specs = dict(base)
        for name, key in self._whole.items():
            own = self.adapter.specs[key]
            rows = check_tensor(self.path, key, own, base[name])
            self.specs[name] = TensorSpec(own.shape, base[name].dtype)
            if rows:
                self.rows[name] = rows
        summary = f"{len(modules)} modules, r={self.config['r']}"
        flags = [f for f in ("use_rslora", "use_dora", "fan_in_fan_out") if self.config.get(f)]
        self.notes.append(
            f"{self.path}: PEFT LoRA adapter ({summary}{', ' if flags else ''}"
            f"{', '.join(flags)}): packed as the pretrained model with the adapter merged"
        )

    def _copy_of(self, name: str, whole: dict[str, str], renamed) -> str | None:
        """The pretrained-named whole tensor that whole tensor `name` equals exactly, if any
        (peft saves both halves of a tied embedding when the vocabulary was resized)."""
        spec = self.adapter.specs[whole[name]]
        for other, key in whole.items():
            target = renamed(other)
            if (
                target in self.pretrained.specs
                and self.adapter.specs[key] == spec
                and torch.equal(self.adapter.load(whole[name]), self.adapter.load(key))
            ):
                return target
        return None

    def _check_module(self, module: str, group: dict[str, str]) -> None:
        a_key = group.get("lora_A.weight") or group.get("lora_embedding_A.weight")
        b_key = group.get("lora_B.weight") or group.get("lora_embedding_B.weight")
        if a_key is None or b_key is None:
            raise TvqError(f"{self.path}: module {module} has no lora_A/lora_B pair")
        a, b = self.adapter.specs[a_key].shape, self.adapter.specs[b_key].shape
        if len(a) != 2 or len(b) != 2:
            raise TvqError(
                f"{self.path}: module {module} is a LoRA on a convolution, which tvq does not "
                "merge (merge it with peft first: merge_and_unload())"
            )
        rank = self._pattern("rank_pattern", module, self.config["r"])
        if a[0] != rank or b[1] != rank:
            raise TvqError(
                f"{self.path}: module {module} has rank {a[0]} in its weights but {rank} in "
                f"{ADAPTER_CONFIG}"
            )
        if "lora_magnitude_vector.weight" in group and "lora_embedding_A.weight" in group:
            raise TvqError(f"{self.path}: DoRA on an embedding ({module}) is not supported")

    def _pattern(self, key: str, module: str, default):
        """peft's `get_pattern_key`: the first pattern p with (.*\\.)?(p)$ matching."""
        for pattern, value in (self.config.get(key) or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        return default

    def _scaling(self, module: str) -> float:
        rank = self._pattern("rank_pattern", module, self.config["r"])
        alpha = self._pattern("alpha_pattern", module, self.config["lora_alpha"])
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    # --- weights ---------------------------------------------------------------------------
    def _tensor(self, key: str) -> torch.Tensor:
        return self.adapter.load_float(key)

    def load_full(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        touched = (self._whole, self._modules, self._tokens, self._biases)
        if not any(name in changes for changes in touched):
            if name not in self.pretrained.specs:
                raise TvqError(f"{self.path}: no tensor named {name}")
            return self.pretrained.load(name)  # unchanged: exactly the pretrained tensor
        if name in self._whole:
            value = self._tensor(self._whole[name])
        else:
            value = self.pretrained.load_float(name)
        if name in self._modules:
            value = self._merge_module(name, value)
        if name in self._biases:
            module, key = self._biases[name]
            value = value + self._tensor(key) * self._scaling(module)
        if name in self._tokens:
            value = self._trainable_rows(name, value)
        return value

    def _merge_module(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        module, group = self._modules[name]
        scaling = self._scaling(module)
        if "lora_embedding_A.weight" in group:
            a = self._tensor(group["lora_embedding_A.weight"])
            b = self._tensor(group["lora_embedding_B.weight"])
            delta = (b @ a).T * scaling
            return _added(self.path, name, weight, delta)
        a, b = self._tensor(group["lora_A.weight"]), self._tensor(group["lora_B.weight"])
        delta = (b @ a) * scaling  # [out, in]
        transposed = bool(self.config.get("fan_in_fan_out"))
        if "lora_magnitude_vector.weight" in group:
            magnitude = self._tensor(group["lora_magnitude_vector.weight"])
            merged = _dora(weight.T if transposed else weight, delta, magnitude)
            return merged.T.contiguous() if transposed else merged
        return _added(self.path, name, weight, delta.T if transposed else delta)

    def _trainable_rows(self, name: str, value: torch.Tensor) -> torch.Tensor:
        module, key = self._tokens[name]
        spec = self.config.get("trainable_token_indices")
        if isinstance(spec, dict):
            found = [v for k, v in spec.items() if module == k or module.endswith("." + k)]
            indices = found[0] if found else None
        else:
            indices = spec
        rows = self._tensor(key)
        if not isinstance(indices, list) or len(indices) != rows.shape[0]:
            raise TvqError(
                f"{self.path}: trainable tokens of {module} do not match "
                f"trainable_token_indices in {ADAPTER_CONFIG}"
            )
        value = value.clone()
        value[torch.tensor(indices, dtype=torch.long)] = rows  # new values, not differences
        return value

    def fingerprint(self) -> str:
        return self.adapter.fingerprint()

    def companions(self) -> Companions:
        """The pretrained folder's files, with the adapter folder's tokenizer (and chat
        template) where it has one: an adapter trained with added tokens ships its tokenizer."""
        pre = self.pretrained.path
        files = read_companions(pre) if pre.is_dir() else Companions()
        return files.overlay(read_companions(self.path), TOKENIZER_FILES)

    def close(self) -> None:
        self.adapter.close()


def _added(where: Path, name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if delta.shape != weight.shape:
        raise TvqError(
            f"{where}: the adapter's update of {name} has shape {list(delta.shape)}, the tensor "
            f"has {list(weight.shape)}"
        )
    return weight + delta


def _dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight ([out, in]): the LoRA-updated rows rescaled to `magnitude`."""
    updated = weight + delta
    return (magnitude / updated.norm(p=2, dim=1)).view(-1, 1) * updated


def _read_config(folder: Path) -> dict:
    """adapter_config.json, checked for what tvq can merge."""
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise TvqError(f"{path}: not a readable adapter config ({exc})") from None
    kind = config.get("peft_type", "LORA")
    refuse = None
    if kind != "LORA":
        refuse = f"it is a {kind} adapter; tvq reads LoRA adapters"
    elif config.get("target_parameters"):
        refuse = "it targets raw parameters (target_parameters)"
    elif config.get("layer_replication"):
        refuse = "it replicates layers (layer_replication), which changes the architecture"
    elif config.get("alora_invocation_tokens"):
        refuse = "an activated LoRA acts only after its invocation tokens; merged it would not"
    elif config.get("megatron_config"):
        refuse = "Megatron-parallel LoRA layers are not supported"
    elif str(config.get("init_lora_weights", "")).lower().startswith(MODIFIED_BASE_INITS):
        refuse = (
            f"init_lora_weights={config['init_lora_weights']!r} changes the base weights it "
            "was trained against (convert it with path_initial_model_for_weight_conversion)"
        )
    elif not isinstance(config.get("r"), int) or not isinstance(
        config.get("lora_alpha"), int | float
    ):
        refuse = "it has no valid r and lora_alpha"
    if refuse:
        raise TvqError(
            f"{path}: cannot pack this adapter: {refuse} (merge it with peft first: "
            "merge_and_unload(), and pack the merged model)"
        )
    return config
