"""`inspect --against` checks that each fine-tune belongs to its task: a swapped order or a
wrong file is an error (or a warning where it cannot be told for sure), not a large error
reported with exit 0; `pack` warns about a task whose vector is all zero."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import finetune, make_checkpoints, run_cli, synthetic_model, write_checkpoint

from tvq_cli.archive import identity
from tvq_cli.io.checkpoint import Checkpoint

SCHEMES = {"tvq": [], "rtvq": [], "fq": ["--bits", "2"]}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path, list[Path], Path]:
    root = tmp_path_factory.mktemp("identity")
    pre, fts = make_checkpoints(root, n_tasks=3)
    other = write_checkpoint(root / "other.safetensors", finetune(synthetic_model(), 9))
    for scheme, extra in SCHEMES.items():
        code, _, err = run_cli(
            "pack", *fts, "--pretrained", pre, "--out", root / f"{scheme}.tvq",
            "--scheme", scheme, *extra,
        )  # fmt: skip
        assert code == 0, err
    return root, pre, fts, other


def _inspect(root: Path, scheme: str, pre: Path, fts: list[Path]) -> tuple[int, str]:
    code, _, err = run_cli("inspect", root / f"{scheme}.tvq", "--json", "--against", pre, *fts)
    return code, err


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_right_order_passes_quietly(packed, scheme):
    root, pre, fts, _ = packed
    assert _inspect(root, scheme, pre, fts) == (0, "")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_swapped_order_is_an_error(packed, scheme):
    root, pre, fts, _ = packed
    code, err = _inspect(root, scheme, pre, [fts[1], fts[0], fts[2]])
    assert code == 1 and err.count("\n") == 1
    assert "not in the archive's task order" in err
    assert f"{fts[1]} (given for task 'task0') and {fts[0]} (for 'task1')" in err
    assert "give them in the order task0, task1, task2" in err


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_wrong_file_is_refused_by_its_recorded_fingerprint(packed, scheme):
    root, pre, fts, other = packed
    code, err = _inspect(root, scheme, pre, [fts[0], other, fts[2]])
    assert (code, err) == (
        1,
        f"tvq: error: {other}: is not the fine-tune task 'task1' was packed from "
        "(fingerprints differ)\n",
    )


@pytest.mark.parametrize("wrong", ["other", "pretrained"])
def test_without_fingerprints_a_wrong_file_is_an_error_where_the_scheme_rules_it_out(
    packed, wrong, monkeypatch
):
    """A version 1 archive records no fingerprints: the statistical checks decide."""
    monkeypatch.setattr(identity, "task_fingerprint", lambda header, task: None)
    root, pre, fts, other = packed
    given = other if wrong == "other" else pre
    code, err = _inspect(root, "tvq", pre, [fts[0], given, fts[2]])
    assert code == 1
    assert f"tvq: error: {given} does not look like the fine-tune of task 'task1'" in err
    code, err = _inspect(root, "rtvq", pre, [fts[0], given, fts[2]])
    assert code == 0
    assert err.startswith(f"tvq: warning: {given} does not look like the fine-tune of task")
    assert err.count("\n") == 1


def test_a_stored_fingerprint_decides(packed, monkeypatch):
    """Where the archive names a fine-tune (by its fingerprint), another checkpoint is refused
    whatever the statistics say."""
    root, pre, fts, _ = packed
    prints = {f"task{i}": Checkpoint(ft).fingerprint() for i, ft in enumerate(fts)}
    monkeypatch.setattr(identity, "task_fingerprint", lambda header, task: prints[task])
    assert _inspect(root, "tvq", pre, fts) == (0, "")
    prints["task2"] = prints["task0"]
    code, err = _inspect(root, "tvq", pre, fts)
    assert code == 1
    assert err == f"tvq: error: {fts[2]}: is not the fine-tune task 'task2' was packed from " \
        "(fingerprints differ)\n"  # fmt: skip


def test_a_different_pretrained_needs_its_own_flag(packed):
    root, _, fts, other = packed
    code, _, err = run_cli("inspect", root / "tvq.tvq", "--against", other, *fts)
    assert code == 1 and "use --allow-different-base" in err
    code, _, err = run_cli(
        "inspect", root / "tvq.tvq", "--json", "--against", other, *fts, "--allow-different-base"
    )
    assert code == 0
    assert err == (
        f"tvq: warning: measuring against {other}, not the pretrained model the archive was "
        "packed from\n"
    )


def test_pack_warns_about_an_all_zero_task_vector(tmp_path):
    pre, fts = make_checkpoints(tmp_path, n_tasks=1)
    out = tmp_path / "a.tvq"
    code, _, err = run_cli("pack", fts[0], pre, "--name", f"base={pre}", "--pretrained", pre,
                           "--out", out)  # fmt: skip
    assert code == 0 and out.exists()
    assert err == (
        f"tvq: warning: task 'base': {pre} is identical to the pretrained checkpoint, so its "
        "task vector is all zero (was the pretrained packed as a task?)\n"
    )
    code, _, err = run_cli("pack", *fts, "--pretrained", pre, "--out", out, "--force")
    assert (code, err) == (0, "")
