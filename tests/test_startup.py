"""Header-only commands start without the heavy modules: `--version`, `--help`, every
command's `--help`, and `inspect` without `--against` (one file or sharded) import no torch,
numpy, safetensors or zstandard. Their speed is measured in benchmarks/bench_startup.py; here,
what they import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import make_checkpoints, run_cli

HEAVY = ("torch", "numpy", "safetensors", "zstandard", "transformers", "compressed_tensors")
COMMANDS = ("pack", "inspect", "merge", "add", "remove", "extract", "demo", "zoo")

# Runs the command line in a fresh interpreter, then reports what it ran and imported.
PROBE = """
import contextlib, io, json, sys
from tvq_cli.__main__ import run
names = set(json.loads(sys.argv.pop(1)))  # the rest is the command line
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        run()
    except SystemExit as exc:
        code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & names)
print(json.dumps({"code": code, "stdout": out.getvalue(), "heavy": heavy}))
"""


def _probe(*args: object) -> dict:
    argv = [sys.executable, "-c", PROBE, json.dumps(HEAVY), *map(str, args)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """One archive as a single file and one sharded, of the same three tasks."""
    root = tmp_path_factory.mktemp("startup")
    pre, fts = make_checkpoints(root, n_tasks=3)
    single, sharded = root / "tasks.tvq", root / "sharded"
    assert run_cli("pack", "--pretrained", pre, *fts, "--out", single)[0] == 0
    code, _, err = run_cli(
        "pack", "--pretrained", pre, *fts, "--out", sharded, "--max-shard-size", "20KB"
    )
    assert code == 0, err
    return single, next(sharded.glob("*.tvq.index.json"))


@pytest.mark.parametrize(
    "args",
    [("--version",), ("--help",), *((c, "--help") for c in COMMANDS), ("zoo", "build", "--help")],
)
def test_version_and_help_import_nothing_heavy(args) -> None:
    result = _probe(*args)
    assert result["code"] == 0
    assert result["stdout"]  # the version, or the help text
    assert result["heavy"] == []


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_without_against_imports_nothing_heavy(archives, sharded, as_json) -> None:
    path = archives[sharded]
    args = ("inspect", path, *(("--json",) if as_json else ()))
    result = _probe(*args)
    code, stdout, _ = run_cli(*args)  # the same report as in-process, where torch is loaded
    assert result["code"] == 0 and code == 0
    assert result["stdout"] == stdout
    assert result["heavy"] == []
    if as_json:
        assert json.loads(stdout)["files"][-1] == str(path)


def test_the_library_loads_torch_when_it_reads_tensors(archives) -> None:
    """The lazy imports still give the library its whole API: a task vector comes back."""
    names = json.dumps(HEAVY)
    code = f"""
import json, sys
import tvq_cli
archive = tvq_cli.open_archive({str(archives[0])!r})
before = sorted({{m.split(".")[0] for m in sys.modules}} & set({names}))
entry = next(t for t in archive.header.tensors if t.kind == "quantized")
tau = archive.task_vector(archive.tasks[0], entry.name)
print(json.dumps([before, list(tau.shape) == list(entry.shape)]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == [[], True]
