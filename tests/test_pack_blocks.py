"""The blocked, threaded pack path writes exactly what whole-tensor `quantize` gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint

import tvq_cli
from tvq_cli.archive.parts import encode_part
from tvq_cli.archive.schemes.rtvq import task_mean
from tvq_cli.pack import PackOptions, blocked
from tvq_cli.pack.blocked import block_rows
from tvq_cli.quant.quantizer import dequantize, quantize

# With blocks of 1024 elements: 203 rows of 9 make blocks of 112 and 91 rows (the last one 819
# elements, not a multiple of 8); 37 rows of 256 make five blocks of 8 rows or fewer.
SHAPES = {"odd.weight": (203, 9), "wide.weight": (37, 256), "norm.weight": (64,)}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 1024)


def _models(root: Path, tasks: int, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    gen = torch.Generator().manual_seed(7)
    pre = {n: torch.randn(s, generator=gen).to(dtype) for n, s in SHAPES.items()}
    pre["odd.weight"][5, :] = 0.0  # an all-zero row: zero span
    fts = []
    for t in range(tasks):
        ft = {
            n: (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).to(dtype)
            for n, v in pre.items()
        }
        ft["odd.weight"][5, :] = 0.0  # a group where nothing changed
        fts.append(write_checkpoint(root / f"ft{t}.safetensors", ft))
    return write_checkpoint(root / "pre.safetensors", pre), fts


def _expected(pre: Path, fts: list[Path], options: PackOptions, name: str) -> dict[str, bytes]:
    """Reference: whole-tensor quantize() in the math of the TVQ/RTVQ papers."""
    from safetensors.torch import load_file

    p = load_file(str(pre))[name].float()
    f = [load_file(str(x))[name].float() for x in fts]
    parts = options.parts([f"ft{i}" for i in range(len(fts))])
    if options.scheme == "tvq":
        values = [(part, x - p) for part, x in zip(parts, f, strict=True)]
    elif options.scheme == "fq":
        values = list(zip(parts, f, strict=True))
    else:
        deltas = [x - p for x in f]
        base = task_mean(deltas, len(deltas))
        base_q = quantize(base, parts[0].spec)
        anchor = dequantize(base_q, parts[0].spec, base.shape) if options.error_correction else base
        values = [(parts[0], base)] + [
            (pt, d - anchor) for pt, d in zip(parts[1:], deltas, strict=True)
        ]
    out = {}
    for part, value in values:
        for key, data in encode_part(part, name, value.shape, quantize(value, part.spec)):
            out[key] = bytes(memoryview(data))
    return out


PAPER = dict(range="minmax", scale_bits=0, codec="raw")


OPTIONS = [
    PackOptions(scheme="tvq", bits=4, group_size=3),  # the defaults: search, 6-bit, zstd
    PackOptions(scheme="tvq", bits=3, group_size=9),
    PackOptions(scheme="tvq", bits=2, group_size=3, scale_bits=0),
    PackOptions(scheme="tvq", bits=4, group_size=3, range="minmax", codec="raw"),
    PackOptions(scheme="fq", bits=5, group_size=3),
    PackOptions(scheme="rtvq", group_size=3),
    PackOptions(scheme="rtvq", group_size=3, error_correction=False),
    PackOptions(scheme="rtvq", group_size=9, codec="raw"),
    PackOptions(scheme="rtvq", group_size=3, range="minmax", scale_bits=0),
    PackOptions(scheme="tvq", bits=4, group_size=0),
    PackOptions(scheme="tvq", bits=4, group_size=1000),  # longer than a row: the row
    PackOptions(scheme="rtvq", group_size=1000, codec="raw"),
    PackOptions(scheme="tvq", bits=3, group_size=0, range="minmax"),  # blocked, compact
    PackOptions(scheme="rtvq", group_size=0, range="minmax"),
    PackOptions(scheme="tvq", bits=4, group_size=3, **PAPER),
    PackOptions(scheme="tvq", bits=3, group_size=9, **PAPER),
    PackOptions(scheme="tvq", bits=2, group_size=0, **PAPER),
    PackOptions(scheme="fq", bits=5, group_size=3, **PAPER),
    PackOptions(scheme="rtvq", group_size=3, **PAPER),
    PackOptions(scheme="rtvq", group_size=3, error_correction=False, **PAPER),
    PackOptions(scheme="rtvq", group_size=0, **PAPER),
]


def options_id(o: PackOptions) -> str:
    return (
        f"{o.scheme}-b{o.bits}-g{o.group_size}-ec{int(o.error_correction)}"
        f"-{o.range}-s{o.scale_bits}-{o.codec}"
    )


@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
def test_archive_matches_whole_tensor_quantize(tmp_path: Path, options) -> None:
    assert block_rows(9) == 112 and block_rows(256) == 8
    pre, fts = _models(tmp_path, tasks=5, dtype=torch.bfloat16)
    out = tmp_path / "a.tvq"
    tvq_cli.pack(pre, fts, out, options, threads=2)
    archive = tvq_cli.open_archive(out)
    for name in ("odd.weight", "wide.weight"):
        for key, expected in _expected(pre, fts, options, name).items():
            assert archive.raw(key).tobytes() == expected, key


def test_thread_counts_give_identical_files(tmp_path: Path) -> None:
    pre, fts = _models(tmp_path, tasks=2, dtype=torch.float16)
    one, two = tmp_path / "one.tvq", tmp_path / "two.tvq"
    for path, threads in ((one, 1), (two, 2)):
        tvq_cli.pack(pre, fts, path, PackOptions(scheme="rtvq", group_size=9), threads=threads)
    assert one.read_bytes() == two.read_bytes()
