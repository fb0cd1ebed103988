"""Safety of `tvq pack`: errors and interrupts leave the previous file and no litter; disk full,
permission denied and inputs vanishing are one clear line; inputs are never overwritten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FullDisk, make_checkpoints, run_cli, write_checkpoint

from tvq_cli.io import atomic as writer_module
from tvq_cli.io.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[1]


def litter(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, list[Path]]:
    """About 200 MB of fp32-equivalent input: pack takes long enough to be interrupted."""
    root = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(0)
    pre = {
        f"l{i}.weight": torch.randn(1024, 2048, generator=gen).to(torch.bfloat16) for i in range(8)
    }
    fts = []
    for t in range(2):
        ft = {
            k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
            for k, v in pre.items()
        }
        fts.append(write_checkpoint(root / f"ft{t}.safetensors", ft))
    return write_checkpoint(root / "pre.safetensors", pre), fts


@pytest.mark.parametrize(
    ("sig", "when"),
    [(signal.SIGTERM, 0), (signal.SIGINT, 2 << 20)],
    ids=["SIGTERM-when-temp-created", "SIGINT-after-2MiB-written"],
)
def test_interrupt_leaves_previous_file_and_no_litter(tmp_path: Path, big, sig, when) -> None:
    pre, fts = big
    out = tmp_path / "a.tvq"
    out.write_bytes(b"previous archive")
    cmd = [
        sys.executable,
        "-m",
        "tvq_cli",
        "pack",
        *map(str, fts),
        "--pretrained",
        str(pre),
        "-o",
        str(out),
        "--force",
        "--threads",
        "1",
        "--group-size",
        "0",
        "-q",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60

    def written() -> int:
        try:
            return sum(p.stat().st_size for p in litter(tmp_path)) if litter(tmp_path) else -1
        except FileNotFoundError:  # renamed into place meanwhile
            return -1

    while written() < when and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert written() >= when, "the temporary archive never appeared or grew"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.decode().strip() == "tvq: interrupted; nothing was written"
    assert out.read_bytes() == b"previous archive"
    assert litter(tmp_path) == []


@pytest.mark.parametrize("room", [0, 8000], ids=["in-header", "in-payload"])
def test_disk_full(tmp_path: Path, monkeypatch, room: int) -> None:
    pre, fts = make_checkpoints(tmp_path, n_tasks=2)
    real_file = writer_module.SequentialFile
    monkeypatch.setattr(
        writer_module, "SequentialFile", lambda *a, **k: FullDisk(real_file(*a, **k), room)
    )
    out = tmp_path / "a.tvq"
    out.write_bytes(b"previous")
    code, _, err = run_cli("pack", *fts, "--pretrained", pre, "-o", out, "--force")
    assert code == 1
    assert err.strip().splitlines() == [f"tvq: error: cannot write {out}: No space left on device"]
    assert out.read_bytes() == b"previous" and litter(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_permission_denied(tmp_path: Path) -> None:
    pre, fts = make_checkpoints(tmp_path, n_tasks=1)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli("pack", *fts, "--pretrained", pre, "-o", locked / "a.tvq")
    finally:
        locked.chmod(0o700)
    assert code == 1
    assert err.strip().splitlines() == [f"tvq: error: cannot write in {locked}: Permission denied"]
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_input_vanishing_mid_read(tmp_path: Path, monkeypatch, how: str) -> None:
    pre, fts = make_checkpoints(tmp_path, n_tasks=2)
    victim = fts[1]
    real_load = Checkpoint.load

    def load(self, name, *args):
        if self.path == victim and victim.exists():
            if how == "truncated":
                os.truncate(victim, victim.stat().st_size // 2)
            else:
                victim.unlink()
        return real_load(self, name, *args)

    monkeypatch.setattr(Checkpoint, "load", load)
    out = tmp_path / "a.tvq"
    code, _, err = run_cli("pack", *fts, "--pretrained", pre, "-o", out)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tvq: error: {victim}: ")
    expected = "truncated or replaced while being read" if how == "truncated" else "vanished"
    assert expected in lines[0]
    assert not out.exists() and litter(tmp_path) == []


def test_refuses_to_overwrite_an_input_even_with_force(tmp_path: Path) -> None:
    pre, fts = make_checkpoints(tmp_path, n_tasks=2)
    before = fts[0].read_bytes()
    for target in (fts[0], pre):
        code, _, err = run_cli("pack", *fts, "--pretrained", pre, "-o", target, "--force")
        assert code == 1
        assert err.strip() == f"tvq: error: {target}: refusing to overwrite an input checkpoint"
    assert fts[0].read_bytes() == before and litter(tmp_path) == []


def test_existing_output_needs_force(tmp_path: Path) -> None:
    pre, fts = make_checkpoints(tmp_path, n_tasks=2)
    out = tmp_path / "a.tvq"
    out.write_bytes(b"previous")
    code, _, err = run_cli("pack", *fts, "--pretrained", pre, "-o", out)
    assert code == 1 and "already exists (use --force to overwrite)" in err
    assert out.read_bytes() == b"previous"
    code, _, err = run_cli("pack", *fts, "--pretrained", pre, "-o", out, "--force")
    assert code == 0, err
    assert out.read_bytes() != b"previous"
    code, _, err = run_cli("inspect", out, "--verify")
    assert code == 0, err
