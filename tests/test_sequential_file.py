"""SequentialFile writes exactly the bytes it is given, with or without O_DIRECT."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tvq_cli.io import sequential
from tvq_cli.io.sequential import SequentialFile

SHM = Path("/dev/shm")  # tmpfs: O_DIRECT is refused there, so the page cache is used


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
@pytest.mark.parametrize("sizes", [[0], [1], [4095, 1, 4097], [3 << 20, 5, 7 << 20]])
def test_writes_exactly_the_bytes(tmp_path: Path, monkeypatch, where, sizes) -> None:
    if where == "tmpfs" and not SHM.is_dir():
        pytest.skip("no /dev/shm here")
    monkeypatch.setattr(sequential, "STAGING", 1 << 20)  # several staging rounds
    folder = tmp_path if where == "disk" else SHM
    path = folder / f"seq-{os.getpid()}-{len(sizes)}.bin"
    rng = np.random.default_rng(sum(sizes))
    chunks = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    try:
        with SequentialFile(path) as f:
            for chunk in chunks:
                assert f.write(chunk) == chunk.size
        assert path.read_bytes() == b"".join(c.tobytes() for c in chunks)
    finally:
        path.unlink(missing_ok=True)


def test_refused_writes_fall_back_to_the_page_cache(tmp_path: Path, monkeypatch) -> None:
    """A file system that accepts O_DIRECT at open but refuses the write (EINVAL)."""
    real_write, calls = os.write, []

    def refuse_once(fd: int, data) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            raise OSError(22, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(sequential.os, "write", refuse_once)
    path = tmp_path / "fallback.bin"
    data = bytes(range(256)) * 100
    with SequentialFile(path) as f:
        f.write(data)
    assert path.read_bytes() == data and len(calls) >= 2
