"""Rounding merged values onto a grid: nearest, floor, and HDRQ 4.3's noise sampling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoints, run_cli, write_checkpoint

from tvq_cli.archive.reader import Archive
from tvq_cli.errors import TvqError
from tvq_cli.merge.rounding import (
    CosineSums,
    MergedTensor,
    Rounding,
    ScaleGrid,
    StepGrid,
    round_on_grid,
)

# Two inputs on one 4-bit grid (step 1): the mean of the first two elements is a .5 tie.
# Nearest rounding (half to even) gives (4, 0); (4, 1) raises both inputs' cosines, (3, 0) the
# second one's only, and both raise the smaller cosine equally.
X1 = torch.tensor([[0.0, 0.0, 0.0, 15.0]])
X2 = torch.tensor([[7.0, 1.0, 0.0, 15.0]])


def _round(x1, x2, seed: int = 0, **options):
    inputs = torch.stack([x1, x2])
    merged = inputs.mean(0)
    grid = ScaleGrid(torch.ones_like(merged), torch.zeros_like(merged), 15)
    ambiguous = (merged - merged.floor()) == 0.5
    rounding = Rounding(**{"mode": "noise", "samples": 16, **options})
    tensor = MergedTensor(merged, inputs, [torch.ones_like(merged)] * 2, lambda x: x.mean(0))
    return round_on_grid(tensor, grid, ambiguous, rounding, torch.Generator().manual_seed(seed))


def test_noise_rounding_resolves_ties_and_never_scores_below_nearest():
    result = _round(X1, X2)
    assert result.ambiguous == 2 and result.values == 4
    nearest = CosineSums.of(
        torch.tensor([[4.0, 0.0, 0.0, 15.0]]), (X1 + X2) / 2, torch.stack([X1, X2])
    )
    assert torch.allclose(result.nearest.cosines(), nearest.cosines())
    assert result.chosen > 0 and result.changed
    assert result.codes[0, :2].tolist() in ([4.0, 1.0], [3.0, 0.0])
    assert float(result.best.cosines().min()) > float(result.nearest.cosines().min())
    every = _round(X1, X2, select="every")
    assert torch.equal(every.codes, torch.tensor([[4.0, 1.0, 0.0, 15.0]]))
    assert bool((every.best.cosines() > every.nearest.cosines()).all())


def test_noise_rounding_is_deterministic_and_nearest_without_samples():
    a, b = _round(X1, X2, 5), _round(X1, X2, 5)
    assert torch.equal(a.codes, b.codes) and a.chosen == b.chosen
    plain = _round(X1, X2, 5, samples=0)
    assert plain.chosen == 0 and not plain.changed
    assert torch.equal(plain.codes, torch.tensor([[4.0, 0.0, 0.0, 15.0]]))


# 256 exact ties, task differences d = 1 (200 of them) and 3 (56). Every rounding of them has
# the same error norm, so raising one input's cosine lowers the other's. Nearest (half to even)
# rounds d = 1 down and d = 3 up, a lopsided error with d.e = -16.
TIES_1 = torch.zeros(1, 256)
TIES_2 = torch.tensor([[1.0] * 200 + [3.0] * 56])


def _lopsidedness(codes: torch.Tensor) -> float:
    return float((TIES_2 - TIES_1).mul(codes - (TIES_1 + TIES_2) / 2).sum())


def test_min_rule_balances_exact_ties_where_the_every_input_rule_cannot_move():
    for seed in range(4):
        every = _round(TIES_1, TIES_2, seed, select="every")
        assert every.chosen == 0 and not every.changed  # no draw improves both inputs at once
        chosen = _round(TIES_1, TIES_2, seed)
        assert chosen.changed
        assert abs(_lopsidedness(chosen.codes)) < abs(_lopsidedness(every.codes)) == 16
        assert float(chosen.best.cosines().min()) > float(chosen.nearest.cosines().min())


def test_without_nearest_the_first_draw_stands_in_for_it():
    drawn = [_round(TIES_1, TIES_2, seed, samples=1, keep_nearest=False) for seed in range(8)]
    assert all(r.chosen == 1 for r in drawn)
    assert len({tuple(r.codes.flatten().tolist()) for r in drawn}) > 1  # random tie-breaking


def test_floor_rounds_every_value_down_but_keeps_integers_up_to_round_off():
    merged = torch.tensor([[0.5, 1.5, 2.99, 3.7, -0.2, 20.0]])
    grid = ScaleGrid(torch.ones_like(merged), torch.zeros_like(merged), 15)
    inputs = torch.stack([merged - 1, merged + 1])
    tensor = MergedTensor(merged, inputs, [None, None], lambda x: x.mean(0))
    nothing = torch.zeros_like(merged, dtype=torch.bool)
    result = round_on_grid(tensor, grid, nothing, Rounding("floor"), torch.Generator())
    assert torch.equal(result.codes, torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.0, 15.0]]))
    assert result.changed and result.chosen is None
    # 13 / 11 * 11 is 12.999999 in float32: an integer up to round-off stays on its level
    eleven = ScaleGrid(torch.tensor([11.0]), torch.zeros(1), 15)
    assert float(eleven.position(torch.tensor([13.0]) / 11)) < 13
    assert torch.equal(eleven.floor(torch.tensor([13.0]) / 11), torch.tensor([13.0]))


def test_step_grid_positions_are_relative_to_its_offset():
    offset = torch.tensor([1.0, -2.0])
    grid = StepGrid(torch.full((2,), 0.5), torch.zeros(2), -8, 7, offset)
    tau = torch.tensor([0.26, 0.0])
    assert torch.equal(grid.nearest(tau), torch.tensor([3.0, -4.0]))  # (1.26, -2) / 0.5
    assert torch.allclose(grid.value(torch.tensor([3.0, -4.0])), torch.tensor([0.5, 0.0]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "round"}, "--rounding must be one of nearest, floor, noise"),
        ({"samples": -1}, "--samples must be 0 or more"),
        ({"tolerance": 0.5}, "--tie-tolerance must be in [0, 0.5)"),
    ],
)
def test_rounding_options_are_checked(options, message):
    with pytest.raises(TvqError, match=re.escape(message)):
        Rounding(**options)


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
    noise = _merge_json(*common, "--out", tmp_path / "noise.tvq")  # the default on this grid
    nearest = _merge_json(*common, "--out", tmp_path / "near.tvq", "--rounding", "nearest")
    _merge_json(*common, "--out", tmp_path / "again.tvq", "--rounding", "noise")
    rounding = noise["rounding"]
    assert rounding["grid"] == "inputs" and noise["output"]["scheme"] == "fq"
    assert rounding["mode"] == "noise" and rounding["samples"] == 16
    assert rounding["select"] == "min" and rounding["nearest_candidate"]
    assert rounding["ambiguous"] == 2 and rounding["values"] == 4
    assert rounding["tensors_changed"] == 1
    row = rounding["per_tensor"][0]
    assert row["chosen"] > 0 and row["changed"]
    assert min(row["cosine_chosen"]) > min(row["cosine_nearest"])
    assert nearest["rounding"]["mode"] == "nearest" and nearest["rounding"]["samples"] == 0
    assert nearest["rounding"]["tensors_changed"] == 0
    assert (tmp_path / "noise.tvq").read_bytes() == (tmp_path / "again.tvq").read_bytes()
    assert (tmp_path / "noise.tvq").read_bytes() != (tmp_path / "near.tvq").read_bytes()
    # written back on the inputs' grid (step 1): a tie resolved the other way than nearest's
    model = tmp_path / "model.safetensors"
    _merge_json(tmp_path / "noise.tvq", "--pretrained", pre, "--method", "average", "--out", model)
    from safetensors.torch import load_file

    assert load_file(model)["w"].tolist() in ([[4.0, 1.0, 0.0, 15.0]], [[3.0, 0.0, 0.0, 15.0]])


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
    common = (archive, "--pretrained", pre, "--method", "ties")
    default = _merge_json(*common, "--out", tmp_path / "d.tvq")["rounding"]
    assert default["mode"] == "nearest" and default["samples"] == 0  # the min-max grid's default
    report = _merge_json(
        *common, "--out", tmp_path / "t.tvq", "--tie-tolerance", 0.3, "--samples", 8,
        "--rounding", "noise",
    )  # fmt: skip
    rounding = report["rounding"]
    assert rounding["grid"] == "min-max" and rounding["ambiguous"] > 0
    for row in rounding["per_tensor"]:
        assert min(row["cosine_chosen"]) >= min(row["cosine_nearest"])


def test_floor_rounding_of_an_fq_average_rounds_ties_down(tmp_path):
    pre, archive = _two_fq_archives(tmp_path)
    out = tmp_path / "floor.tvq"
    report = _merge_json(
        archive, "--pretrained", pre, "--method", "average", "--out", out, "--rounding", "floor"
    )
    assert report["rounding"]["mode"] == "floor" and report["rounding"]["tensors_changed"] == 1
    model = tmp_path / "model.safetensors"
    _merge_json(out, "--pretrained", pre, "--method", "average", "--out", model)
    from safetensors.torch import load_file

    # (3.5, 0.5, 0, 15) floors to (3, 0, 0, 15); nearest (half to even) gives (4, 0, 0, 15)
    assert torch.allclose(load_file(model)["w"], torch.tensor([[3.0, 0.0, 0.0, 15.0]]))
