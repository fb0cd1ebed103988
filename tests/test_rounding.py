"""Noise-sampled rounding (HDRQ 4.3) of quantized merge outputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import make_checkpoints, run_cli, write_checkpoint

from tvq_cli.archive.reader import Archive
from tvq_cli.merge.rounding import CosineSums, Grid, noise_round

# Two inputs on one 4-bit grid (step 1): the mean of the first two elements is a .5 tie.
# Nearest rounding (half to even) gives (4, 0); (4, 1) is closer to the interpolation line.
X1 = torch.tensor([[0.0, 0.0, 0.0, 15.0]])
X2 = torch.tensor([[7.0, 1.0, 0.0, 15.0]])


def _round(seed: int, samples: int = 16):
    inputs = torch.stack([X1, X2])
    merged = inputs.mean(0)
    grid = Grid(torch.ones_like(merged), torch.zeros_like(merged), 15)
    ambiguous = (merged - merged.floor()) == 0.5
    return noise_round(
        merged,
        inputs,
        [torch.ones_like(merged)] * 2,
        lambda x: x.mean(0),
        grid,
        ambiguous,
        samples,
        torch.Generator().manual_seed(seed),
    )


def test_noise_rounding_resolves_ties_and_never_scores_below_nearest():
    result = _round(0)
    assert result.ambiguous == 2
    nearest = CosineSums.of(
        torch.tensor([[4.0, 0.0, 0.0, 15.0]]), (X1 + X2) / 2, torch.stack([X1, X2])
    )
    assert torch.allclose(result.nearest.cosines(), nearest.cosines())
    assert result.chosen > 0
    assert torch.equal(result.codes, torch.tensor([[4.0, 1.0, 0.0, 15.0]]))
    assert bool((result.best.cosines() > result.nearest.cosines()).all())


def test_noise_rounding_is_deterministic_and_nearest_without_samples():
    a, b = _round(5), _round(5)
    assert torch.equal(a.codes, b.codes) and a.chosen == b.chosen
    plain = _round(5, samples=0)
    assert plain.chosen == 0
    assert torch.equal(plain.codes, torch.tensor([[4.0, 0.0, 0.0, 15.0]]))


def _two_fq_archives(root: Path) -> tuple[Path, Path]:
    """Two 4-bit FQ archives (one range per tensor) whose average is tie-heavy."""
    pre = write_checkpoint(root / "pre.safetensors", {"w": torch.zeros(1, 4)})
    a = write_checkpoint(root / "a.safetensors", {"w": X1.clone()})
    b = write_checkpoint(root / "b.safetensors", {"w": X2.clone()})
    archive = root / "ab.tvq"
    code, _, err = run_cli(
        "pack", a, b, "--pretrained", pre, "--out", archive, "--scheme", "fq", "--bits", 4,
        "--group-size", 0,
    )  # fmt: skip
    assert code == 0, err
    return pre, archive


def _merge_json(*args) -> dict:
    code, out, err = run_cli("merge", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_average_of_two_4bit_archives_changes_and_reports(tmp_path):
    pre, archive = _two_fq_archives(tmp_path)
    common = (archive, "--pretrained", pre, "--method", "average")
    noise = _merge_json(*common, "--out", tmp_path / "noise.tvq")
    nearest = _merge_json(*common, "--out", tmp_path / "near.tvq", "--rounding", "nearest")
    _merge_json(*common, "--out", tmp_path / "again.tvq")
    rounding = noise["rounding"]
    assert rounding["grid"] == "inputs" and noise["output"]["scheme"] == "fq"
    assert rounding["ambiguous"] == 2 and rounding["tensors_changed"] == 1
    row = rounding["per_tensor"][0]
    assert row["chosen"] > 0
    assert all(c > n for c, n in zip(row["cosine_chosen"], row["cosine_nearest"], strict=True))
    assert nearest["rounding"]["tensors_changed"] == 0
    assert (tmp_path / "noise.tvq").read_bytes() == (tmp_path / "again.tvq").read_bytes()
    assert (tmp_path / "noise.tvq").read_bytes() != (tmp_path / "near.tvq").read_bytes()
    # written back on the inputs' grid: decoded weights are (4, 1, 0, 15) * step 1
    model = tmp_path / "model.safetensors"
    _merge_json(tmp_path / "noise.tvq", "--pretrained", pre, "--method", "average", "--out", model)
    from safetensors.torch import load_file

    assert torch.allclose(load_file(model)["w"], torch.tensor([[4.0, 1.0, 0.0, 15.0]]))


def test_same_grid_step_is_the_mean_of_input_steps(tmp_path):
    pre, fts = make_checkpoints(tmp_path, 2)
    archive = tmp_path / "fq.tvq"
    run_cli("pack", *fts, "--pretrained", pre, "--out", archive, "--scheme", "fq", "--bits", 4)
    out = tmp_path / "avg.tvq"
    _merge_json(archive, "--pretrained", pre, "--method", "average", "--out", out)
    inputs, merged = Archive(archive), Archive(out)
    entry = inputs.entry("layers.0.fc.weight")
    steps = [1 / inputs.quantized(p, entry).scales for p in entry.parts]
    out_entry = merged.entry("layers.0.fc.weight")
    out_scales = merged.quantized(out_entry.parts[0], out_entry).scales
    assert torch.allclose(1 / out_scales, (steps[0] + steps[1]) / 2)


def test_noise_rounding_never_below_nearest_on_a_merge(tmp_path):
    pre, fts = make_checkpoints(tmp_path, 3)
    archive = tmp_path / "a.tvq"
    run_cli("pack", *fts, "--pretrained", pre, "--out", archive, "--bits", 3)
    report = _merge_json(
        archive, "--pretrained", pre, "--method", "ties", "--out", tmp_path / "t.tvq",
        "--tie-tolerance", 0.3, "--samples", 8,
    )  # fmt: skip
    rounding = report["rounding"]
    assert rounding["grid"] == "min-max" and rounding["ambiguous"] > 0
    for row in rounding["per_tensor"]:
        assert all(c >= n for c, n in zip(row["cosine_chosen"], row["cosine_nearest"], strict=True))
