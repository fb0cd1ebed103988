"""Building the zoo: pretrain once, then probe and fine-tune one backbone copy per task.

The whole build is seeded and single-threaded, so the same seed gives bit-identical
``model.safetensors`` files, and it takes seconds on a laptop CPU: the zoo is an example
and a test fixture, not a benchmark of training.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from .data import DEFAULT_DATA_SEED, JITTER, PRETRAIN_DIGITS, TASKS, pretrain_split, train_images
from .evaluate import accuracy
from .layout import (
    HEADS_DIR,
    MANIFEST_NAME,
    PRETRAINED_DIR,
    ZOO_FORMAT,
    ZOO_VERSION,
    Zoo,
    is_current,
)
from .merge import task_arithmetic
from .model import BackboneConfig, backbone_state, load_backbone
from .store import save_checkpoint, save_head, write_json
from .train import TrainConfig, deterministic, finetune, linear_probe, pretrain

REFERENCE_LAMBDA = 0.3


def _model_config(arch: BackboneConfig, seed: int, task: str | None) -> dict[str, object]:
    return {
        **arch.to_dict(),
        "architectures": ["TvqZooBackbone"],
        "torch_dtype": "float32",
        "tvq_zoo": {"version": ZOO_VERSION, "seed": seed, "task": task},
    }


def _rel_norm(delta: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> float:
    num = sum(float(v.double().pow(2).sum()) for v in delta.values())
    den = sum(float(v.double().pow(2).sum()) for v in weights.values())
    return (num / den) ** 0.5


def build_zoo(out_dir: Path, seed: int = 0, force: bool = False) -> Zoo:
    """Build the example zoo into ``out_dir``, or open it if it is already built with ``seed``.

    Writes ``pretrained/``, one folder per task, ``heads/`` and finally ``zoo.json``.
    """
    out_dir = Path(out_dir)
    if not force and is_current(out_dir, seed):
        return Zoo.load(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Drop the old manifest first: until the new one is written the folder is not a zoo.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    data_seed = DEFAULT_DATA_SEED
    arch = BackboneConfig()
    cfg = TrainConfig()
    records: list[dict[str, object]] = []
    with deterministic(seed):
        x_pre, y_pre = pretrain_split(data_seed)
        base = pretrain(arch, x_pre, y_pre, cfg, np.random.default_rng([seed, 0]))
        pre_state = backbone_state(base)
        save_checkpoint(out_dir / PRETRAINED_DIR, pre_state, _model_config(arch, seed, None))

        x_train, digits_train = train_images(data_seed)
        finetuned: list[dict[str, torch.Tensor]] = []
        heads = {}
        for name, spec in TASKS.items():
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            model = load_backbone(arch, pre_state)
            y = spec.relabel(digits_train)
            head = linear_probe(model, x_train, y, spec.n_classes, cfg, rng)
            probe_acc = accuracy(model, head, name, data_seed)
            finetune(model, head, x_train, y, cfg, rng)
            state = backbone_state(model)
            save_checkpoint(out_dir / name, state, _model_config(arch, seed, name))
            save_head(out_dir / HEADS_DIR / f"{name}.safetensors", head)
            finetuned.append(state)
            heads[name] = head
            delta = {k: state[k] - pre_state[k] for k in state}
            records.append(
                {
                    "name": name,
                    "description": spec.description,
                    "n_classes": spec.n_classes,
                    "checkpoint": f"{name}/model.safetensors",
                    "head": f"{HEADS_DIR}/{name}.safetensors",
                    "accuracy_pretrained_probe": round(probe_acc, 2),
                    "accuracy_finetuned": round(accuracy(model, head, name, data_seed), 2),
                    "task_vector_rel_norm": round(_rel_norm(delta, state), 5),
                }
            )

        merged = load_backbone(arch, task_arithmetic(pre_state, finetuned, REFERENCE_LAMBDA))
        for rec in records:
            name = str(rec["name"])
            rec["accuracy_task_arithmetic"] = round(
                accuracy(merged, heads[name], name, data_seed), 2
            )

    manifest = {
        "format": ZOO_FORMAT,
        "version": ZOO_VERSION,
        "seed": seed,
        "data_seed": data_seed,
        "dataset": "UCI optdigits test set as bundled with scikit-learn (data/digits.csv.gz)",
        "jitter_pixels": JITTER,
        "pretraining": {"digits": list(range(PRETRAIN_DIGITS)), "objective": "classification"},
        "architecture": arch.to_dict(),
        "n_parameters": sum(v.numel() for v in pre_state.values()),
        "training": cfg.to_dict(),
        "task_arithmetic_lambda": REFERENCE_LAMBDA,
        "heads": "linear probe on the frozen pretrained backbone, kept frozen in fine-tuning",
        "tasks": records,
    }
    write_json(out_dir / MANIFEST_NAME, manifest)
    return Zoo.load(out_dir)
