"""Merging the zoo's real task vectors gives models that load, run and keep their accuracy."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import run_cli

from tvq_cli.zoo import Zoo, evaluate, evaluate_state, mean_accuracy, task_arithmetic_fp32
from tvq_cli.zoo.model import BackboneConfig, load_backbone
from tvq_cli.zoo.store import load_state


def test_task_arithmetic_from_8_bit_archive_matches_fp32(zoo: Zoo, tmp_path: Path) -> None:
    archive, merged = tmp_path / "tasks8.tvq", tmp_path / "merged"
    code, _, err = run_cli(
        "pack", "--pretrained", zoo.pretrained.parent, *(p.parent for p in zoo.tasks.values()),
        "--bits", "8", "--out", archive, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        "merge", archive, "--pretrained", zoo.pretrained.parent, "--method", "task_arithmetic",
        "--out", merged, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    # The folder is a loadable model that runs: right shapes, finite outputs.
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    model = load_backbone(BackboneConfig(), load_state(merged))
    with torch.no_grad():
        features = model(torch.rand(5, 64))
    assert features.shape == (5, 128) and torch.isfinite(features).all()
    quantized = mean_accuracy(evaluate(merged, zoo))
    reference = mean_accuracy(evaluate_state(task_arithmetic_fp32(zoo), zoo))
    pretrained = mean_accuracy(evaluate(zoo.pretrained, zoo))
    assert abs(quantized - reference) <= 0.1
    assert quantized > pretrained + 3.0  # the merge is worth having
