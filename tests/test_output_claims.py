"""Who may write an output: one tvq process at a time (a second fails at once), temporary files
of a killed run named and cleaned by the next, and folders replaced only when tvq wrote them.

The concurrency tests use real processes: a writer is frozen (SIGSTOP) or killed (SIGKILL)
once its temporary output exists, and a second run goes at the same target.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_cli, write_checkpoint

from tvq_cli.io.target import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
TEMP = re.compile(r"\.(.+)\.tvq-[0-9a-f]{8}\.tmp")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """A pretrained checkpoint, two fine-tunes (16 MiB each: a run takes long enough to be
    caught mid-write) and their archive."""
    root = tmp_path_factory.mktemp("model")
    gen = torch.Generator().manual_seed(0)
    pre = {f"l{i}.weight": torch.randn(1024, 1024, generator=gen) for i in range(4)}
    fts = [
        write_checkpoint(
            root / f"ft{t}.safetensors",
            {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in pre.items()},
        )
        for t in range(2)
    ]
    pre_path = write_checkpoint(root / "pre.safetensors", pre)
    archive = root / "tasks.tvq"
    code, _, err = run_cli("pack", *fts, "--pretrained", pre_path, "--out", archive)
    assert code == 0, err
    return pre_path, fts, archive


def _pack_args(model, out: Path) -> list:
    pre, fts, _ = model
    return ["pack", *fts, "--pretrained", pre, "--out", out, "--threads", "1", "--force"]


def _merge_args(model, out: Path) -> list:
    pre, _, archive = model
    return ["merge", archive, "--pretrained", pre, "--method", "ties", "--out", out, "--force"]


def _start(args: list) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tvq_cli", *map(str, args), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _temps(out: Path) -> list[str]:
    return sorted(
        p.name for p in out.parent.iterdir() if (m := TEMP.fullmatch(p.name)) and m[1] == out.name
    )


def _caught_writing(proc: subprocess.Popen, out: Path, sig: signal.Signals) -> list[str]:
    """Send `sig` to `proc` as soon as its temporary output exists; returns the temporaries."""
    deadline = time.monotonic() + 120
    while not _temps(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(sig)
    temps = _temps(out)
    assert temps, f"the writer finished or failed first: {proc.communicate()}"
    return temps


@pytest.mark.parametrize("kind", ["archive", "folder"])
def test_a_second_writer_fails_while_the_first_writes(tmp_path, model, kind):
    out = tmp_path / {"archive": "a.tvq", "folder": "merged"}[kind]
    args = _pack_args if kind == "archive" else _merge_args
    first = _start(args(model, out))
    try:
        _caught_writing(first, out, signal.SIGSTOP)
        code, _, err = run_cli(*args(model, out))
        assert code == 1
        assert err == (
            f"tvq: error: {out}: another tvq process (pid {first.pid}) is writing it; "
            "wait for it to finish\n"
        )
    finally:
        first.send_signal(signal.SIGCONT)
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert out.exists() and _temps(out) == []
    assert not (tmp_path / f".{out.name}.tvq-lock").exists()
    if kind == "archive":
        assert run_cli("inspect", out, "--verify")[0] == 0


@pytest.mark.parametrize("kind", ["archive", "folder"])
def test_a_killed_run_is_cleaned_up_by_the_next(tmp_path, model, kind):
    out = tmp_path / {"archive": "a.tvq", "folder": "merged"}[kind]
    args = _pack_args if kind == "archive" else _merge_args
    killed = _start(args(model, out))
    left = _caught_writing(killed, out, signal.SIGKILL)
    killed.communicate(timeout=60)
    assert _temps(out) == left and not out.exists()  # what a killed run leaves behind
    code, _, err = run_cli(*args(model, out))
    assert code == 0, err
    assert err == (
        f"tvq: warning: removed 1 temporary file(s) left by an interrupted run: {left[0]}\n"
    )
    assert _temps(out) == [] and out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # nor the lock file


def _merged_folder(tmp_path: Path, model) -> Path:
    out = tmp_path / "merged"
    code, _, err = run_cli(*_merge_args(model, out))
    assert code == 0, err
    return out


def test_force_replaces_a_folder_tvq_wrote(tmp_path, model):
    out = _merged_folder(tmp_path, model)
    (out / "model.safetensors").unlink()  # fewer files than the manifest lists is fine
    code, _, err = run_cli(*_merge_args(model, out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "model.safetensors"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "added",
            "holds 1 file(s) tvq did not write there (or that changed since), e.g. notes.txt",
        ),
        ("changed", "e.g. model.safetensors"),
        ("no-manifest", f"was not written by tvq (no {MANIFEST})"),
        ("bad-manifest", f"was not written by tvq (no {MANIFEST})"),
    ],
)
def test_a_folder_with_files_tvq_did_not_write_is_never_emptied(tmp_path, model, change, message):
    out = _merged_folder(tmp_path, model)
    if change == "added":
        (out / "notes.txt").write_text("mine")
    elif change == "changed":
        with open(out / "model.safetensors", "ab") as f:
            f.write(b"x")
    elif change == "no-manifest":
        (out / MANIFEST).unlink()
    else:
        (out / MANIFEST).write_text("[]")
    before = {p.name: p.stat().st_size for p in out.iterdir()}
    code, _, err = run_cli(*_merge_args(model, out))
    assert code == 1 and message in err and "refusing to replace it" in err
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before


def test_outputs_never_replace_the_other_kind(tmp_path, model):
    folder = tmp_path / "x.safetensors"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    code, _, err = run_cli(*_merge_args(model, folder))
    assert code == 1 and "is a folder, and the output is a file" in err
    file = tmp_path / "merged"
    file.write_text("mine")
    code, _, err = run_cli(*_merge_args(model, file))
    assert code == 1 and "is a file, and the output is a folder" in err
    assert (folder / "keep.txt").read_text() == "mine" and file.read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(*_merge_args(model, empty))  # holds nothing: --force replaces it
    assert code == 0, err
