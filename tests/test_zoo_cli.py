"""`tvq zoo build` and `tvq zoo eval`: thin commands over the zoo library."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_cli

from tvq_cli.zoo import Zoo, evaluate, mean_accuracy


def test_build_reuses_a_built_zoo_and_prints_its_accuracies(zoo: Zoo) -> None:
    before = {p: p.stat().st_mtime_ns for p in zoo.all_files()}
    code, out, err = run_cli("zoo", "build", zoo.root)
    assert code == 0 and err == ""
    assert {p: p.stat().st_mtime_ns for p in zoo.all_files()} == before
    mean_row = next(line for line in out.splitlines() if "mean" in line)
    numbers = [float(x) for x in mean_row.replace("│", " ").split()[1:]]
    tasks = zoo.manifest["tasks"]
    expected = [
        sum(t[k] for t in tasks) / len(tasks)
        for k in ("accuracy_pretrained_probe", "accuracy_finetuned", "accuracy_task_arithmetic")
    ]
    assert numbers == [round(e, 2) for e in expected]
    for name in zoo.tasks:
        assert name in out


def test_eval_json_matches_the_library(zoo: Zoo) -> None:
    code, out, err = run_cli("zoo", "eval", zoo.tasks["parity"].parent, "--zoo", zoo.root, "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    expected = evaluate(zoo.tasks["parity"], zoo)
    assert report["accuracy"] == expected
    assert report["mean"] == mean_accuracy(expected)


def test_eval_selected_tasks_as_a_table(zoo: Zoo) -> None:
    code, out, _ = run_cli(
        "zoo", "eval", zoo.pretrained, "--zoo", zoo.root, "--tasks", "mod3,digit"
    )
    assert code == 0
    assert "mod3" in out and "digit" in out and "parity" not in out
    expected = evaluate(zoo.pretrained, zoo, ["mod3", "digit"])
    assert f"{expected['mod3']:.2f}" in out


def test_eval_errors_are_one_line(zoo: Zoo, tmp_path: Path) -> None:
    cases = [
        (tmp_path / "missing.safetensors", zoo.root, "no such file or folder"),
        (zoo.pretrained, tmp_path, "is not a model zoo"),
        (zoo.head_path("digit"), zoo.root, "does not match the zoo backbone"),
    ]
    for checkpoint, root, message in cases:
        code, out, err = run_cli("zoo", "eval", checkpoint, "--zoo", root)
        assert code == 1 and out == ""
        assert err.startswith("tvq: error:") and message in err and err.count("\n") == 1
    code, _, err = run_cli("zoo", "eval", zoo.pretrained, "--zoo", zoo.root, "--tasks", "nope")
    assert code == 2 and "unknown task" in err


def test_build_into_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    code, _, err = run_cli("zoo", "build", target)
    assert code == 1 and "not a folder" in err and target.read_text() == "x"
