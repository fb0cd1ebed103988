"""A scaled-down run of benchmarks/results.py: the orderings docs/results.md reports hold."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.zoo import Zoo

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "results.py"


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("tvq_results_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cells(results, zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """FP32, FQ 4, TVQ 4, TVQ 2 and RTVQ B3O2 with the paper's quantizer; task arithmetic."""
    wanted = ("FP32", "FQ 4", "TVQ 4", "TVQ 2", "RTVQ B3O2")
    columns = [c for c in results.COLUMNS if c[0] in wanted]
    methods = [("Task Arithmetic", "task_arithmetic")]
    work = tmp_path_factory.mktemp("results")
    out = results.accuracy_cells(zoo, work, results.PAPER, columns, methods)
    return {c.label: c for c in out}


def test_accuracy_ordering_on_the_zoo(cells: dict) -> None:
    fp32, fq4, tvq4, tvq2, rtvq = (
        cells[k] for k in ("FP32", "FQ 4", "TVQ 4", "TVQ 2", "RTVQ B3O2")
    )
    ta, ind = "Task Arithmetic", "Individual"
    # TVQ 4-bit matches FP32; FQ 4-bit is clearly below it (measured: -3.5 vs -0.1 points).
    assert abs(tvq4.acc[ta] - fp32.acc[ta]) < 0.5 and abs(tvq4.acc[ind] - fp32.acc[ind]) < 0.5
    assert fq4.acc[ta] < tvq4.acc[ta] - 2.0
    # 2 bits cost the individual fine-tunes; RTVQ B3O2 wins most of that back (-1.4 vs -0.3).
    assert tvq2.acc[ind] < tvq4.acc[ind] - 0.5
    assert rtvq.acc[ind] > tvq2.acc[ind] + 0.5
    # Every merge keeps well above the pretrained backbone (82.8).
    assert min(c.acc[ta] for c in cells.values()) > 85.0


def test_error_and_bits_of_the_columns(cells: dict) -> None:
    # FQ's reconstructed task vector is mostly error; TVQ's is not; RTVQ beats TVQ 2-bit.
    assert cells["FQ 4"].rel_l2 > 1.0 > cells["TVQ 2"].rel_l2 > cells["RTVQ B3O2"].rel_l2
    assert cells["TVQ 4"].rel_l2 < 0.25 and cells["FP32"].rel_l2 == 0.0
    # Per-tensor metadata is negligible: the paper's bit widths, 2.375 for B3O2 with 8 tasks.
    assert cells["TVQ 4"].quant_bpw == pytest.approx(4.0, abs=0.01)
    assert cells["TVQ 2"].quant_bpw == pytest.approx(2.0, abs=0.01)
    assert cells["RTVQ B3O2"].quant_bpw == pytest.approx(2.375, abs=0.01)
    assert cells["FP32"].bpw > 32 > cells["TVQ 4"].bpw > cells["RTVQ B3O2"].bpw


def test_table_renders_every_cell(results, cells: dict) -> None:
    order = [cells[k] for k in ("FP32", "FQ 4", "TVQ 4", "TVQ 2", "RTVQ B3O2")]
    text = results.accuracy_markdown(order, ["Individual", "Task Arithmetic"])
    rows = [r.strip("|").split("|") for r in text.splitlines()]
    assert [r[0].strip() for r in rows[4:6]] == ["Individual", "Task Arithmetic"]
    assert all(len(r) == 6 for r in rows)
    delta = float(rows[5][2].split("(")[1].rstrip(") "))
    expected = order[1].acc["Task Arithmetic"] - order[0].acc["Task Arithmetic"]
    assert delta == pytest.approx(expected, abs=0.051)


def test_storage_dry_run_reads_only_headers(results, tmp_path: Path, monkeypatch) -> None:
    """ViT-L/14 shapes as a sparse file: `tvq pack --dry-run` with raw codes sizes it exactly
    without touching a weight."""
    pre = tmp_path / "vit.safetensors"
    params = results.write_sparse_safetensors(pre, results.vit_l14_visual_shapes())
    assert params == 303_966_208  # open_clip ViT-L/14 image encoder
    assert pre.stat().st_blocks * 512 < 1 << 20  # a hole, not 1.2 GB of zeros
    tasks = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.safetensors").symlink_to(pre)
        tasks.append(tmp_path / f"{name}.safetensors")

    def refuse(self, name):  # noqa: ARG001
        raise AssertionError("dry run read a weight")

    monkeypatch.setattr(Checkpoint, "load", refuse)
    args = ["--pretrained", pre, *tasks, *results.PAPER_FLAGS]
    int4 = results.dry_run_bytes([str(a) for a in [*args, "--bits", "4"]])
    int2 = results.dry_run_bytes([str(a) for a in [*args, "--bits", "2"]])
    assert 4.0 < 8 * int4 / (2 * params) < 4.05
    assert 2.0 < 8 * int2 / (2 * params) < 2.05
    # 2 bits more per quantized weight (all but the 1-D tensors, 0.1 % of the weights)
    assert int4 - int2 == pytest.approx(2 * params * 2 / 8, rel=2e-3)
