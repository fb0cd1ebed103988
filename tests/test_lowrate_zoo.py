"""`tvq pack --budget` below one bit per weight on the example zoo: never over the budget, the
R-D target met, merges and extraction unchanged on low-rate archives, and at equal or twice
the bytes ahead of the reference compressors (benchmarks/references.py) on own-task accuracy."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from tvq_cli import PackOptions, inspect_archive, open_archive, pack
from tvq_cli.archive.format import LOW_RATE
from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.merge import extract
from tvq_cli.pack import dry_run
from tvq_cli.zoo import Zoo, evaluate_state, mean_accuracy

REFERENCES = Path(__file__).resolve().parent.parent / "benchmarks" / "references.py"


@pytest.fixture(scope="module")
def packed(zoo: Zoo, tmp_path_factory: pytest.TempPathFactory):
    """Archives of the zoo at (scheme, budget), packed once."""
    root = tmp_path_factory.mktemp("lowrate")
    cache: dict[tuple[str, float], Path] = {}

    def get(scheme: str, budget: float) -> Path:
        if (scheme, budget) not in cache:
            out = root / f"{scheme}-{budget}.tvq"
            pack(zoo.pretrained, list(zoo.tasks.values()), out, PackOptions(scheme, budget=budget))
            cache[scheme, budget] = out
        return cache[scheme, budget]

    return get


@pytest.mark.parametrize(
    ("scheme", "budget"), [("tvq", 0.25), ("tvq", 0.5), ("tvq", 1.0), ("rtvq", 0.5)]
)
def test_budget_is_never_exceeded_and_meets_the_rd_target(zoo: Zoo, packed, scheme, budget):
    """Whole archive counted; rel-L2 <= 1.25 x 2^-R (the issue's target); every quantized part
    low-rate (1-D tensors too: exact they alone would cost 0.8 bpw on the zoo)."""
    out = packed(scheme, budget)
    report = inspect_archive(out, against=(zoo.pretrained, list(zoo.tasks.values())))
    assert report["bits_per_weight"] <= budget
    assert report["bits_per_weight"] > 0.98 * budget  # the budget is spent
    assert report["error"]["rel_l2"] <= 1.25 * 2**-budget
    assert report["parameters"]["exact"] == 0
    assert all(q["codec"] == LOW_RATE for q in report["quantization"])


def test_dry_run_is_exact_under_a_low_rate_budget(zoo: Zoo, packed):
    dry = dry_run(zoo.pretrained, list(zoo.tasks.values()), PackOptions(budget=0.5))
    assert dry.size_bytes == packed("tvq", 0.5).stat().st_size


def test_merges_and_extraction_work_unchanged_on_low_rate_archives(zoo: Zoo, packed, tmp_path):
    """Every merge method runs on the dequantized task vectors; task arithmetic is exactly
    theta_pre + lambda * sum of the decoded task vectors; `extract` gives theta_pre + tau_hat."""
    archive_path = packed("tvq", 0.5)
    archive = open_archive(archive_path)
    pre = Checkpoint(zoo.pretrained)
    for method in ("task_arithmetic", "ties", "dare", "tall", "magmax", "consensus", "emr"):
        out = tmp_path / f"{method}.safetensors"
        args = ["merge", archive_path, "--pretrained", zoo.pretrained, "--method", method]
        extra = ["--task", "mod3"] if method in ("tall", "emr") else []
        code, _, err = run_cli(*args, *extra, "--out", out, "-q")
        assert code == 0, err
    merged = load_file(str(tmp_path / "task_arithmetic.safetensors"))
    for name in pre.names:
        taus = sum(archive.task_vector(t, name) for t in archive.tasks)
        assert torch.allclose(merged[name], pre.load_float(name) + 0.3 * taus, atol=1e-7)
    extract(archive_path, "parity", zoo.pretrained, tmp_path / "parity.safetensors")
    rebuilt = load_file(str(tmp_path / "parity.safetensors"))
    for name in pre.names:
        expected = pre.load_float(name) + archive.task_vector("parity", name)
        assert torch.equal(rebuilt[name], expected)


def test_add_and_remove_keep_the_other_tasks_records(zoo: Zoo, packed, tmp_path):
    """A task added takes the first task's step per tensor; the others' records are copied."""
    path = tmp_path / "a.tvq"
    path.write_bytes(packed("rtvq", 0.5).read_bytes())
    before = open_archive(path)
    old = {(t, n): before.task_vector(t, n) for t in before.tasks for n in before.entries}
    code, _, err = run_cli(
        "add",
        path,
        "--pretrained",
        zoo.pretrained,
        "--name",
        f"again={zoo.tasks['loops'].parent}",
        zoo.tasks["loops"].parent,
    )
    assert code == 0, err
    code, _, err = run_cli("remove", path, "--task", "digit")
    assert code == 0, err
    after = open_archive(path)
    assert after.tasks == [*before.tasks[1:], "again"]
    assert after.verify()
    for (task, name), tau in old.items():
        if task != "digit":
            assert torch.equal(after.task_vector(task, name), tau)
    loops = Checkpoint(zoo.tasks["loops"])
    pre = Checkpoint(zoo.pretrained)
    error = sum(
        float(
            (after.task_vector("again", n) - (loops.load_float(n) - pre.load_float(n)))
            .square()
            .sum()
        )
        for n in pre.names
    )
    norm = sum(float((loops.load_float(n) - pre.load_float(n)).square().sum()) for n in pre.names)
    assert (error / norm) ** 0.5 < 1.0


def _own_task(zoo: Zoo, hats: dict[str, dict[str, torch.Tensor]]) -> float:
    """Mean accuracy of each fine-tune rebuilt alone, scored on its own task."""
    pre = Checkpoint(zoo.pretrained)
    scores = {}
    for task, tau in hats.items():
        state = {n: pre.load_float(n) + tau[n] for n in pre.names}
        scores[task] = evaluate_state(state, zoo, [task])[task]
    return mean_accuracy(scores)


def test_accuracy_orders_tvq_ahead_of_the_references_on_the_zoo(zoo: Zoo, packed):
    """The storage use case: each fine-tune rebuilt alone. tvq at 0.5 bpw (RTVQ) scores above
    BitDelta at twice the bytes, and TVQ at 0.5 bpw above ComPEFT at the same bytes."""
    spec = importlib.util.spec_from_file_location("tvq_references", REFERENCES)
    refs = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = refs
    spec.loader.exec_module(refs)
    pre = Checkpoint(zoo.pretrained)
    weights = {n: pre.load_float(n).numpy() for n in pre.names}
    taus = {
        t: {n: Checkpoint(path).load_float(n).numpy() - w for n, w in weights.items()}
        for t, path in zoo.tasks.items()
    }
    shapes = {n: w.shape for n, w in weights.items()}
    params = sum(w.size for w in weights.values())

    def bpw(payload: dict[str, int]) -> float:
        return 8 * refs.archive_bytes(shapes, payload) / (len(taus) * params)

    def tensors(hats):
        return {
            t: {n: torch.from_numpy(np.asarray(v)) for n, v in h.items()} for t, h in hats.items()
        }

    bitdelta, payload = refs.per_tensor(refs.bitdelta, taus)
    assert 0.9 < bpw(payload) < 1.2
    orders = refs.magnitude_orders(taus)
    compeft, payload, _ = refs.at_rate(
        lambda keep: refs.per_tensor(refs.compeft, taus, orders, keep=keep), bpw, 0.5
    )
    assert bpw(payload) <= 0.5

    def decoded(path: Path) -> dict[str, dict[str, torch.Tensor]]:
        archive = open_archive(path)
        return {t: {n: archive.task_vector(t, n) for n in pre.names} for t in archive.tasks}

    rtvq, tvq = (
        _own_task(zoo, decoded(packed("rtvq", 0.5))),
        _own_task(zoo, decoded(packed("tvq", 0.5))),
    )
    assert rtvq > _own_task(zoo, tensors(bitdelta))
    assert tvq > _own_task(zoo, tensors(compeft)) + 1.0
