"""Opening a safetensors file reads its header and nothing of its tensor data."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tvq_cli.errors import TvqError
from tvq_cli.io.safetensors_file import MAX_HEADER_BYTES, read_header, read_prefix


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(512, 512), "b": torch.zeros(512)}, str(path))
    return path


def _length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_reads_exactly_the_header(model: Path) -> None:
    size = model.stat().st_size
    with open(model, "rb") as f:
        prefix = read_prefix(f, size)
        assert f.tell() == len(prefix)  # not one byte of tensor data
    assert len(prefix) == 8 + _length(model) < size
    doc, start = read_header(model)
    assert set(doc) >= {"w", "b"} and start == len(prefix)


def test_header_length_out_of_range_is_refused(model: Path) -> None:
    data = bytearray(model.read_bytes())
    data[:8] = struct.pack("<Q", MAX_HEADER_BYTES + 8)
    model.write_bytes(bytes(data))
    with open(model, "rb") as f:
        assert read_prefix(f, len(data)) == bytes(data[:8])
    with pytest.raises(TvqError, match="header length is out of range"):
        read_header(model)


def test_file_cut_inside_its_header_is_refused(model: Path) -> None:
    model.write_bytes(model.read_bytes()[: 8 + _length(model) // 2])
    with pytest.raises(TvqError, match="header length is out of range"):
        read_header(model)
