"""Pack's by-rows route (tensors too large to hold once per input, coded role by role from
blocks of rows read as needed) writes the same archive bytes as the route that holds them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from test_pack_blocks import OPTIONS, _models, options_id

import tvq_cli
from tvq_cli.errors import TvqError, TvqWarning
from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.pack import PackOptions, blocked, rows


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 1024)
    monkeypatch.setattr(rows, "BATCH_BYTES", 3000)  # several batches per pass


def _pack_both(monkeypatch, tmp_path, pre, fts, options, **kwargs) -> tuple[Path, Path, list]:
    """The archive packed holding every tensor, and packed with every 2-D quantized tensor
    read by rows; the names the by-rows route coded."""
    held = tmp_path / "held.tvq"
    tvq_cli.pack(pre, fts, held, options, **kwargs)
    coded: list[str] = []
    original = rows.RowsRoute.pack

    def spy(self, entry, emit, status):
        coded.append(entry.name)
        return original(self, entry, emit, lambda text: (said.append(text), status(text)))

    said: list[str] = []

    by_rows = tmp_path / "rows.tvq"
    with monkeypatch.context() as patch:
        patch.setattr(rows, "ROWS_ABOVE", 0)
        patch.setattr(rows.RowsRoute, "pack", spy)
        tvq_cli.pack(pre, fts, by_rows, options, **kwargs)
    assert len(said) == len(coded) * len(options.rules.roles(["t"] * len(fts)))
    return held, by_rows, coded


@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
def test_same_bytes_as_holding_every_input(monkeypatch, tmp_path: Path, options) -> None:
    pre, fts = _models(tmp_path, tasks=5, dtype=torch.bfloat16)
    held, by_rows, coded = _pack_both(monkeypatch, tmp_path, pre, fts, options, threads=2)
    assert held.read_bytes() == by_rows.read_bytes()
    uncoupled = options.scheme != "rtvq" or options.error_correction
    parts = options.parts([f"t{i}" for i in range(5)])
    expected = [
        name
        for name, cols in (("odd.weight", 9), ("wide.weight", 256))
        if uncoupled and all(blocked.blockable(p, cols) for p in parts)
    ]
    assert coded == expected and (coded or not uncoupled or options.group_size == 0)


def test_added_rows_and_mixed_dtypes(monkeypatch, tmp_path: Path) -> None:
    """A fine-tune that grew the embedding by 3 rows (new tokens) in fp32 over a bf16 base, one
    in fp16 and one equal to the pretrained model."""
    gen = torch.Generator().manual_seed(3)
    pre = {"embed.weight": torch.randn(203, 9, generator=gen).to(torch.bfloat16)}
    pre["head.weight"] = torch.randn(37, 18, generator=gen).to(torch.bfloat16)
    grown = {n: v.float() + 0.05 * torch.randn(v.shape, generator=gen) for n, v in pre.items()}
    grown["embed.weight"] = torch.cat([grown["embed.weight"], torch.randn(3, 9, generator=gen)])
    half = {n: (v.float() - 0.03).to(torch.float16) for n, v in pre.items()}
    paths = [
        write_checkpoint(tmp_path / f"{n}.safetensors", t)
        for n, t in (("grown", grown), ("half", half), ("same", pre))
    ]
    pre_path = write_checkpoint(tmp_path / "pre.safetensors", pre)
    for scheme in ("tvq", "rtvq"):
        options = PackOptions(scheme=scheme, group_size=3)
        folder = tmp_path / scheme
        folder.mkdir()
        held, by_rows, coded = _pack_both(monkeypatch, folder, pre_path, paths, options)
        monkeypatch.undo()
        assert coded == ["embed.weight", "head.weight"]
        assert held.read_bytes() == by_rows.read_bytes()
        archive = tvq_cli.open_archive(by_rows)
        tau = archive.task_vector("grown", "embed.weight")
        assert tau.shape == (203, 9)
        assert archive.header.task_info["grown"].fingerprint == Checkpoint(paths[0]).fingerprint()


def test_warns_of_a_fine_tune_equal_to_the_pretrained(monkeypatch, tmp_path) -> None:
    pre, fts = _models(tmp_path, tasks=1, dtype=torch.bfloat16)
    monkeypatch.setattr(rows, "ROWS_ABOVE", 0)
    with pytest.warns(TvqWarning, match="identical to the pretrained checkpoint") as caught:
        tvq_cli.pack(pre, [fts[0], pre], tmp_path / "a.tvq")
    assert len(caught) == 1 and str(pre) in str(caught[0].message)


def test_non_finite_values_name_their_file(monkeypatch, tmp_path: Path) -> None:
    pre, fts = _models(tmp_path, tasks=2, dtype=torch.float32)
    from safetensors.torch import load_file

    bad = load_file(str(fts[1]))
    bad["wide.weight"][30, 7] = float("nan")
    write_checkpoint(fts[1], bad)
    monkeypatch.setattr(rows, "ROWS_ABOVE", 0)
    for scheme in ("tvq", "rtvq", "fq"):
        with pytest.raises(TvqError, match=f"{fts[1]}: tensor wide.weight contains NaN"):
            tvq_cli.pack(pre, fts, tmp_path / f"{scheme}.tvq", PackOptions(scheme=scheme))
        assert not (tmp_path / f"{scheme}.tvq").exists()


def test_non_finite_pretrained_values_name_the_pretrained(monkeypatch, tmp_path: Path) -> None:
    pre, fts = _models(tmp_path, tasks=2, dtype=torch.float32)
    from safetensors.torch import load_file

    bad = load_file(str(pre))
    bad["wide.weight"][3, 0] = float("inf")
    write_checkpoint(pre, bad)
    monkeypatch.setattr(rows, "ROWS_ABOVE", 0)
    for scheme in ("tvq", "rtvq", "fq"):
        with pytest.raises(TvqError, match=f"{pre}: tensor wide.weight contains NaN or Inf"):
            tvq_cli.pack(pre, fts, tmp_path / f"{scheme}.tvq", PackOptions(scheme=scheme))


def test_which_tensors_go_by_rows(monkeypatch, tmp_path: Path) -> None:
    """Past the bound, 2-D tensors of parts coded by blocks, from fine-tunes stored as read and
    under a scheme whose task roles follow from the shared ones' reconstruction."""
    from tvq_cli.pack.plan import plan_archive
    from tvq_cli.pack.run import open_inputs

    pre, fts = _models(tmp_path, tasks=2, dtype=torch.bfloat16)
    opened, sources = open_inputs(pre, fts)
    try:

        def chosen(options: PackOptions, sources=sources) -> list[str]:
            header = plan_archive(opened, sources, ["a", "b"], options).header
            scheme, ec = options.rules, options.error_correction
            return [e.name for e in header.tensors if rows.by_rows(e, scheme, ec, sources)]

        options = PackOptions(group_size=3)
        assert chosen(options) == []  # under the bound: held
        monkeypatch.setattr(rows, "ROWS_ABOVE", 0)
        assert chosen(options) == ["odd.weight"]  # 256 columns are not groups of 3
        assert chosen(PackOptions(group_size=0, range="minmax")) == ["odd.weight", "wide.weight"]
        assert chosen(PackOptions(scheme="rtvq", group_size=3, error_correction=False)) == []

        class Computed(type(sources[0])):
            def row_source(self, name):  # as a LoRA adapter's weights
                return None

        computed = [sources[0], Computed(fts[1], opened)]
        assert chosen(options, computed) == []
        computed[1].close()
    finally:
        for source in sources:
            source.close()
        opened.close()
