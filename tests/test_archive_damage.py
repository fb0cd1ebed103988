"""Damaged archives: every truncation and bit flip is reported as TvqError, never a crash and
never different numbers; `tvq inspect --verify` exits non-zero on damage."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import make_checkpoints, run_cli

import tvq_cli
from tvq_cli.errors import TvqError
from tvq_cli.pack import PackOptions


@pytest.fixture(scope="module", params=["tvq", "rtvq", "tvq-budget", "rtvq-budget"])
def archive(request, tmp_path_factory) -> Path:
    """Dense parts; or, under a budget, low-rate records in frames (1-D tensors included)."""
    scheme, _, budget = request.param.partition("-")
    root = tmp_path_factory.mktemp(request.param)
    pre, fts = make_checkpoints(root, n_tasks=2)
    out = root / "a.tvq"
    options = PackOptions(scheme=scheme, group_size=16, budget=3.0 if budget else None)
    tvq_cli.pack(pre, fts, out, options, threads=2)
    assert bool(tvq_cli.open_archive(out).header.frames) == bool(budget)
    return out


def read_everything(path: Path) -> dict[str, np.ndarray]:
    """Every number the reader can hand out, after a full verify."""
    archive = tvq_cli.open_archive(path)
    archive.verify()
    values = {}
    for entry in archive.header.tensors:
        if entry.kind == "shared":
            values[entry.name] = archive.shared(entry.name).numpy().copy()
            continue
        for task in archive.tasks:
            values[f"{task}/{entry.name}"] = archive.task_vector(task, entry.name).numpy()
    archive.close()
    return values


def damaged(path: Path, data: bytes) -> Path:
    out = path.with_name("damaged.tvq")
    out.write_bytes(data)
    return out


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def stored_ranges(data: bytes) -> dict[str, tuple[int, int]]:
    doc = json.loads(data[8 : 8 + header_length(data)])
    doc.pop("__metadata__")
    start = 8 + header_length(data)
    return {k: (start + v["data_offsets"][0], start + v["data_offsets"][1]) for k, v in doc.items()}


def assert_damaged(path: Path) -> None:
    with pytest.raises(TvqError):
        read_everything(path)


def test_intact_archive_reads_and_verifies(archive: Path) -> None:
    assert read_everything(archive)
    code, out, err = run_cli("inspect", archive, "--verify", "--json")
    assert code == 0, err
    verified = json.loads(out)["verified"]
    assert verified["payload_bytes"] == archive.stat().st_size - 8 - header_length(
        archive.read_bytes()
    )


def test_truncated_anywhere(archive: Path) -> None:
    data = archive.read_bytes()
    end = 8 + header_length(data)
    cuts = {0, 1, 7, 8, 9, 20, end // 2, end - 1, end, end + 1, len(data) // 2, len(data) - 1}
    cuts |= {start + 1 for start, _ in stored_ranges(data).values()}
    for cut in sorted(c for c in cuts if c < len(data)):
        assert_damaged(damaged(archive, data[:cut]))


def test_bit_flips_in_header_length(archive: Path) -> None:
    data = archive.read_bytes()
    for byte in range(8):
        for bit in (0, 1, 2, 3, 7):
            flipped = bytearray(data)
            flipped[byte] ^= 1 << bit
            assert_damaged(damaged(archive, bytes(flipped)))


def test_bit_flips_across_the_header_json(archive: Path) -> None:
    """Every 11th byte of the JSON (metadata, checksums, entries, padding), two bits each (bit 5
    turns a hex digit's case: the same number, still reported)."""
    data = archive.read_bytes()
    for pos in range(8, 8 + header_length(data), 11):
        for bit in (0, 5):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            assert_damaged(damaged(archive, bytes(flipped)))


def test_bit_flip_in_every_stored_tensor(archive: Path) -> None:
    data = archive.read_bytes()
    for key, (start, end) in stored_ranges(data).items():
        for pos in {start, (start + end) // 2, end - 1}:
            flipped = bytearray(data)
            flipped[pos] ^= 0x10
            path = damaged(archive, bytes(flipped))
            assert_damaged(path)
            code, _, err = run_cli("inspect", path, "--verify")
            assert code == 1 and f"checksum mismatch in {key}" in err, err


def reencode(data: bytes, edit) -> bytes:
    """Apply `edit` to the parsed tvq header and rebuild a container with a valid checksum."""
    length = header_length(data)
    doc = json.loads(data[8 : 8 + length])
    meta = json.loads(doc["__metadata__"]["tvq"])
    edit(meta)
    text = json.dumps(meta, separators=(",", ":"))
    sums = json.loads(doc["__metadata__"]["tvq.checksums"])
    sums["__header__"] = f"{zlib.crc32(text.encode()) & 0xFFFFFFFF:08x}"
    doc["__metadata__"] = {"tvq": text, "tvq.checksums": json.dumps(sums)}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def test_wrong_format_version(archive: Path) -> None:
    path = damaged(archive, reencode(archive.read_bytes(), lambda m: m.update(version=4)))
    with pytest.raises(TvqError, match="unsupported archive format version 4"):
        read_everything(path)
    code, _, err = run_cli("inspect", path, "--verify")
    assert code == 1 and len(err.strip().splitlines()) == 1


def test_header_with_wrong_bits_is_rejected(archive: Path) -> None:
    def edit(meta):
        quantized = next(t for t in meta["tensors"] if t["kind"] == "quantized")
        if isinstance(quantized["parts"][0], int):  # a framed record given a size of its own
            quantized["parts"][0] += 1
        else:
            quantized["parts"][0][1] += 1

    assert_damaged(damaged(archive, reencode(archive.read_bytes(), edit)))


def _low_rate(meta) -> dict:
    return next(t for t in meta["tensors"] if t["parts"] and isinstance(t["parts"][0], int))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["frames"].popitem(), "wrong frames"),
        (lambda m: m["frames"].update({"task:nobody": 5}), "wrong frames"),
        (lambda m: m["frames"].update(dict.fromkeys(m["frames"], 0)), "wrong frames"),
        (lambda m: m.update(version=2), "no frames"),
        (lambda m: _low_rate(m)["parts"].__setitem__(0, ["offset:task0", 4, 16]), "wrong roles"),
        (lambda m: _low_rate(m)["parts"].pop(), "wrong roles"),
        (lambda m: _low_rate(m)["parts"].__setitem__(0, -1), "bad coded size"),
        (lambda m: _low_rate(m)["parts"].__setitem__(0, 2.5), "malformed"),
        (lambda m: _low_rate(m).update(shape=[]), "malformed"),
    ],
)
def test_low_rate_headers_are_checked(tmp_path: Path, edit, message) -> None:
    """Frames for exactly the roles that have framed records, low-rate parts in role order
    (their role is their place) with a size only when not framed, only in version 3."""
    pre, fts = make_checkpoints(tmp_path, n_tasks=2)
    out = tmp_path / "a.tvq"
    tvq_cli.pack(pre, fts, out, PackOptions(scheme="rtvq", budget=3.0), threads=1)
    with pytest.raises(TvqError, match=message):
        read_everything(damaged(out, reencode(out.read_bytes(), edit)))


def test_edited_header_without_new_checksum(archive: Path) -> None:
    data = archive.read_bytes()
    tampered = data.replace(b'tool_version\\":\\"0.1.0', b'tool_version\\":\\"0.1.1', 1)
    assert tampered != data
    with pytest.raises(TvqError, match="header checksum mismatch"):
        read_everything(damaged(archive, tampered))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda info: info.update(files={"../escape": "0" * 64}), "malformed"),
        (lambda info: info.update(rows={"nope": 2}), "rows of nope"),
        (lambda info: info.update(dtype="F64"), "dtype 'F64'"),
        (lambda info: info.update(surprise=1), "unknown task field 'surprise'"),
        (lambda info: info.update(fingerprint="md5:1"), "fingerprint"),
    ],
)
def test_task_records_are_checked(archive: Path, edit, message) -> None:
    """A task record naming files outside the archive, tensors it does not have, or fields
    no version knows is a damaged or foreign header, whatever its checksum says."""

    def change(meta):
        edit(meta["task_info"][meta["tasks"][0]])

    with pytest.raises(TvqError, match=message):
        read_everything(damaged(archive, reencode(archive.read_bytes(), change)))
