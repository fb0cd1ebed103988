"""What every command promises: a usage error (the command line itself is wrong) exits 2, an
error in the inputs exits 1, each as one line on stderr; a Ctrl-C, even while tvq is still
importing or opening its inputs, is one line and exit 130, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoints, run_cli, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
INTERRUPTED = "tvq: interrupted; nothing was written\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    pre, fts = make_checkpoints(root, n_tasks=2)
    archive = root / "a.tvq"
    assert run_cli("pack", *fts, "--pretrained", pre, "--out", archive)[0] == 0
    return {"root": root, "pre": pre, "ft": fts[0], "ft2": fts[1], "archive": archive}


# Per command: command lines that are wrong in themselves (exit 2) and command lines that are
# right but meet a bad input (exit 1), with a piece of the one-line message.
USAGE = {
    "pack": [
        (["pack", "{ft}", "--out", "{root}/x.tvq"], "Missing option '--pretrained'"),
        (["pack", "{ft}", "--pretrained", "{pre}"], "--out is required"),
        (["pack", "{ft}", "--pretrained", "{pre}", "--out", "{root}/x.tvq", "--bits", "9"],
         "bits must be between 1 and 8"),
        (["pack", "{ft}", "--pretrained", "{pre}", "--out", "{root}/x.tvq", "--bits", "four"],
         "Invalid value for '--bits'"),
    ],
    "inspect": [
        (["inspect"], "Missing argument"),
        (["inspect", "{archive}", "--against", "{pre}"], "--against needs the pretrained"),
        (["inspect", "{archive}", "--against", "{pre}", "{ft}"],
         "needs the pretrained checkpoint and 2 fine-tuned ones"),
    ],
    "merge": [
        (["merge", "{archive}", "--pretrained", "{pre}", "--out", "{root}/m.safetensors"],
         "--method is required"),
        (["merge", "{archive}", "--pretrained", "{pre}", "--method", "ties", "--out",
          "{root}/m.safetensors", "--topk", "200"], "--topk must be in"),
        (["merge", "{archive}", "--pretrained", "{pre}", "--method", "average", "--out",
          "{root}/m.safetensors", "--tasks", "nope"], "no task named 'nope'"),
    ],
    "add": [
        (["add", "{archive}", "{ft2}"], "Missing option '--pretrained'"),
        (["add", "{archive}", "{ft}", "--pretrained", "{pre}"], "already holds a task 'task0'"),
        (["add", "{archive}", "{ft2}", "--pretrained", "{pre}", "--max-shard-size", "1KB"],
         "is one file; --max-shard-size"),
    ],
    "remove": [
        (["remove", "{archive}"], "Missing option '--task'"),
        (["remove", "{archive}", "--task", "zz"], "has no task 'zz'"),
        (["remove", "{archive}", "--task", "task0", "--task", "task1"], "would leave no task"),
    ],
    "extract": [
        (["extract", "{archive}", "--pretrained", "{pre}", "--out", "{root}/x"],
         "Missing option '--task'"),
        (["extract", "{archive}", "--task", "zz", "--pretrained", "{pre}", "--out", "{root}/x"],
         "no task named 'zz'"),
        (["extract", "{archive}", "--task", "task0", "--pretrained", "{pre}", "--out", "{root}/x",
          "--max-shard-size", "lots"], "invalid size"),
    ],
    "zoo build": [(["zoo", "build", "{root}/zoo", "--seed", "x"], "Invalid value for '--seed'")],
    "zoo eval": [(["zoo", "eval", "{pre}"], "Missing option '--zoo'")],
    "demo": [(["demo", "--frobnicate"], "No such option")],
}  # fmt: skip
INPUT = {
    "pack": (["pack", "{root}/nope", "--pretrained", "{pre}", "--out", "{root}/x.tvq"],
             "no such file or folder"),
    "inspect": (["inspect", "{pre}"], "not a tvq archive"),
    "merge": (["merge", "{archive}", "--pretrained", "{ft}", "--method", "average", "--out",
               "{root}/m.safetensors"], "was packed against a different pretrained model"),
    "add": (["add", "{archive}", "{root}/nope", "--pretrained", "{pre}"], "no such file or folder"),
    "remove": (["remove", "{pre}", "--task", "x"], "not a tvq archive"),
    "extract": (["extract", "{archive}", "--task", "task0", "--pretrained", "{ft}", "--out",
                 "{root}/x"], "is not the pretrained checkpoint"),
    "zoo build": (["zoo", "build", "{pre}"], "exists and is not a folder"),
    "zoo eval": (["zoo", "eval", "{pre}", "--zoo", "{root}"], "is not a model zoo"),
    "demo": (["demo", "--dir", "{pre}"], "exists and is not a folder"),
}  # fmt: skip


def _fill(args: list[str], inputs: dict[str, Path]) -> list[str]:
    return [a.format(**inputs) for a in args]


@pytest.mark.parametrize("command", list(USAGE))
def test_usage_errors_exit_2_and_input_errors_exit_1(inputs, command):
    before = sorted(p.name for p in inputs["root"].iterdir())
    for args, message in USAGE[command]:
        code, stdout, err = run_cli(*_fill(args, inputs))
        assert (code, stdout) == (2, ""), (args, err)
        assert err.startswith("tvq: error: ") and err.count("\n") == 1 and message in err, err
    args, message = INPUT[command]
    code, stdout, err = run_cli(*_fill(args, inputs))
    assert (code, stdout) == (1, ""), (args, err)
    assert err.startswith("tvq: error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in inputs["root"].iterdir()) == before


def _interrupt_when(args: list, ready) -> tuple[int, str]:
    """Run `tvq ARGS` and send SIGINT once `ready(pid)` holds; returns (exit code, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tvq_cli", *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while not ready(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert proc.poll() is None, "the command ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err.decode()


def _importing_torch(pid: int) -> bool:
    """torch's native library is mapped: the import of torch (a second or more) is under way."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _has_open(path: Path):
    def ready(pid: int) -> bool:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
            return any(os.readlink(fd) == str(path) for fd in fds)
        except OSError:
            return False

    return ready


linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")


@linux_only
def test_ctrl_c_while_importing_is_one_line(inputs):
    """torch is imported by the commands that read tensors (here --against), not at start-up."""
    args = ["inspect", inputs["archive"], "--against", inputs["pre"], inputs["ft"], inputs["ft2"]]
    code, err = _interrupt_when(args, _importing_torch)
    assert (code, err) == (130, INTERRUPTED)


@linux_only
def test_ctrl_c_while_opening_inputs_is_one_line(tmp_path):
    gen = torch.Generator().manual_seed(0)
    pre = {f"l{i}.weight": torch.randn(1024, 1024, generator=gen) for i in range(8)}
    pre_path = write_checkpoint(tmp_path / "pre.safetensors", pre)
    ft = write_checkpoint(tmp_path / "ft.safetensors", {k: v + 0.01 for k, v in pre.items()})
    out = tmp_path / "a.tvq"
    code, err = _interrupt_when(
        ["pack", ft, "--pretrained", pre_path, "--out", out, "--threads", "1"], _has_open(ft)
    )
    assert (code, err) == (130, INTERRUPTED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.safetensors", "pre.safetensors"]


def test_a_bare_command_shows_its_help():
    for args in ([], ["zoo"]):
        code, stdout, err = run_cli(*args)
        assert code == 2 and "Usage" in stdout + err and "tvq: error" not in err
