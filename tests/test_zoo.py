"""The example zoo: deterministic, well-formed, and behaving like real fine-tunes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvq_cli.errors import TvqError
from tvq_cli.zoo import (
    TASKS,
    Zoo,
    build_zoo,
    evaluate,
    evaluate_state,
    mean_accuracy,
    task_arithmetic_fp32,
)
from tvq_cli.zoo.data import heldout_split, load_digits, split_indices
from tvq_cli.zoo.layout import is_current
from tvq_cli.zoo.train import deterministic


@pytest.fixture(scope="module")
def pretrained_acc(zoo: Zoo) -> dict[str, float]:
    return evaluate(zoo.pretrained, zoo.root)


def test_digits_are_bundled_and_split_cleanly() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype.name == "float32"
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    train, test = split_indices()
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 1797
    # Stratified: every digit is in the test set.
    assert sorted(set(y[test].tolist())) == list(range(10))


def test_zoo_layout(zoo: Zoo) -> None:
    assert len(zoo.tasks) >= 8 and list(zoo.tasks) == list(TASKS)
    assert zoo.pretrained == zoo.root / "pretrained" / "model.safetensors"
    for name, path in zoo.tasks.items():
        assert path == zoo.root / name / "model.safetensors"
        assert (path.parent / "config.json").is_file()
        assert zoo.head_path(name).is_file()
    manifest = json.loads((zoo.root / "zoo.json").read_text())
    assert manifest["seed"] == 0 and [t["name"] for t in manifest["tasks"]] == list(zoo.tasks)


def test_backbones_share_keys_shapes_and_dtype(zoo: Zoo) -> None:
    reference = load_file(str(zoo.pretrained))
    assert "embed.weight" in reference and "final_norm.bias" in reference
    assert {"layers.0.fc.weight", "layers.0.norm.weight"} <= set(reference)
    assert 100_000 <= sum(t.numel() for t in reference.values()) <= 300_000
    for path in zoo.tasks.values():
        state = load_file(str(path))
        assert list(state) == list(reference)
        for name, tensor in state.items():
            assert tensor.dtype == torch.float32
            assert tensor.shape == reference[name].shape
    head = load_file(str(zoo.head_path("digit")))
    assert set(head) == {"weight", "bias"} and head["weight"].shape == (10, 128)


def test_same_seed_gives_identical_files(zoo: Zoo, tmp_path: Path) -> None:
    again = build_zoo(tmp_path / "again", seed=0)
    for ours, theirs in zip(zoo.all_files(), again.all_files(), strict=True):
        assert ours.relative_to(zoo.root) == theirs.relative_to(again.root)
        assert ours.read_bytes() == theirs.read_bytes(), ours
    assert (zoo.root / "zoo.json").read_bytes() == (again.root / "zoo.json").read_bytes()


def test_existing_zoo_is_reused(zoo: Zoo) -> None:
    before = {p: p.stat().st_mtime_ns for p in zoo.all_files()}
    start = time.perf_counter()
    again = build_zoo(zoo.root, seed=0)
    assert time.perf_counter() - start < 2.0
    assert again.tasks == zoo.tasks
    assert {p: p.stat().st_mtime_ns for p in again.all_files()} == before
    assert is_current(zoo.root, seed=0) and not is_current(zoo.root, seed=1)


def test_each_finetune_beats_the_pretrained_probe(
    zoo: Zoo, pretrained_acc: dict[str, float]
) -> None:
    for name, path in zoo.tasks.items():
        finetuned = evaluate(path, zoo.root, tasks=[name])[name]
        assert finetuned >= pretrained_acc[name] + 5.0, (name, finetuned, pretrained_acc[name])


def test_task_arithmetic_beats_pretrained_on_average(
    zoo: Zoo, pretrained_acc: dict[str, float]
) -> None:
    merged = evaluate_state(task_arithmetic_fp32(zoo, lam=0.3), zoo)
    assert list(merged) == list(zoo.tasks)
    assert mean_accuracy(merged) >= mean_accuracy(pretrained_acc) + 3.0


def test_manifest_records_the_measured_accuracies(
    zoo: Zoo, pretrained_acc: dict[str, float]
) -> None:
    for record in zoo.manifest["tasks"]:
        assert record["accuracy_pretrained_probe"] == pytest.approx(
            pretrained_acc[record["name"]], abs=0.01
        )
        # Task vectors are small next to the weights, like real fine-tunes.
        assert 0.0 < record["task_vector_rel_norm"] < 0.1


def test_evaluate_accepts_file_folder_and_shards(zoo: Zoo, tmp_path: Path) -> None:
    path = zoo.tasks["parity"]
    by_file = evaluate(path, zoo.root, tasks=["parity", "mod3"])
    assert evaluate(path.parent, zoo.root, tasks=["parity", "mod3"]) == by_file

    state = load_file(str(path))
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:5]}
    shards["model-00002-of-00002.safetensors"] = names[5:]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(sharded / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert evaluate(sharded, zoo.root, tasks=["parity", "mod3"]) == by_file


def test_evaluate_rejects_foreign_checkpoints(zoo: Zoo, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    save_file({"embed.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(TvqError):
        evaluate(bad, zoo.root)
    with pytest.raises(TvqError):
        evaluate(tmp_path / "missing", zoo.root)
    with pytest.raises(TvqError):
        evaluate(zoo.pretrained, zoo.root, tasks=["no-such-task"])
    with pytest.raises(TvqError):
        Zoo.load(tmp_path)


def test_heldout_split_is_fixed() -> None:
    a, b = heldout_split("digit"), heldout_split("digit")
    assert (a.x == b.x).all() and (a.y == b.y).all()
    assert (heldout_split("parity").y == a.y % 2).all()


def test_deterministic_restores_torch_settings() -> None:
    threads = torch.get_num_threads()
    flag = torch.are_deterministic_algorithms_enabled()
    state = torch.get_rng_state()
    with deterministic(seed=123):
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        torch.rand(3)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == flag
    assert torch.equal(torch.get_rng_state(), state)
