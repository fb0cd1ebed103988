"""Large tensors merged a chunk of rows at a time (`merge.chunks`): the same bytes as the whole
tensor, the same checks (pretrained fingerprint, damaged stored bytes, zstd frames cut short),
and rows written in order by the model writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import finetune
from safetensors.torch import load_file, save_file

import tvq_cli
from tvq_cli.errors import InternalError, TvqError
from tvq_cli.io.checkpoint import TensorSpec
from tvq_cli.io.model_writer import SafetensorsStream
from tvq_cli.merge import MergeRequest, chunks, merge
from tvq_cli.merge.base import REGISTRY
from tvq_cli.merge.engine import Engine
from tvq_cli.merge.request import check_request
from tvq_cli.pack import PackOptions
from tvq_cli.quant import entropy

SETTINGS = {
    "defaults": PackOptions(),  # zstd-c frames, 6-bit scales, groups of 128 (a row of 96)
    "raw codes": PackOptions(codec="raw", group_size=32),  # bit-packed codes read by range
    "3-bit zstd, fp32 scales": PackOptions(bits=3, group_size=16, codec="zstd", scale_bits=0),
    "rtvq": PackOptions(scheme="rtvq"),  # base plus offset, decoded to fp32 a chunk at a time
    "rtvq, raw codes": PackOptions(scheme="rtvq", codec="raw", group_size=32),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A pretrained checkpoint (one bf16 tensor of 203 rows: not a multiple of a chunk) and
    three fine-tunes."""
    folder = tmp_path_factory.mktemp("model")
    gen = torch.Generator().manual_seed(0)
    pre = {
        "embed.weight": (0.02 * torch.randn(203, 96, generator=gen)).to(torch.bfloat16),
        "fc.weight": 0.02 * torch.randn(64, 48, generator=gen),
        "norm.weight": torch.ones(96),
        "position_ids": torch.arange(5),
    }
    save_file(pre, str(folder / "pre.safetensors"))
    for i in range(3):
        save_file(finetune(pre, i), str(folder / f"ft{i}.safetensors"))
    return folder


def pack(model: Path, options: PackOptions, name: str = "a.tvq") -> Path:
    archive = model / name
    if not archive.exists():
        fts = sorted(model.glob("ft*.safetensors"))
        tvq_cli.pack(model / "pre.safetensors", fts, archive, options)
    return archive


@pytest.fixture
def small_chunks(monkeypatch):
    """Every 2-D float tensor in chunks of 8 rows."""
    monkeypatch.setattr(chunks, "WHOLE_LIMIT", 0)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)


def merged_bytes(archive: Path, model: Path, out: Path, method: str, **options) -> bytes:
    merge(MergeRequest([archive], model / "pre.safetensors", out, method, **options))
    return out.read_bytes()


ELEMENTWISE = ["task_arithmetic", "ties", "average", "magmax", "lines"]


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("method", ELEMENTWISE)
def test_chunks_give_the_whole_tensors_bytes(model, tmp_path, monkeypatch, setting, method):
    archive = pack(model, SETTINGS[setting], f"{setting}.tvq")
    whole = merged_bytes(archive, model, tmp_path / "whole.safetensors", method)
    monkeypatch.setattr(chunks, "WHOLE_LIMIT", 0)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)
    seen = []
    decode_piece = Engine.decode_piece
    monkeypatch.setattr(
        Engine, "decode_piece", lambda self, p, base: seen.append(p) or decode_piece(self, p, base)
    )
    chunked = merged_bytes(archive, model, tmp_path / "chunked.safetensors", method)
    embed = [p.rows for p in seen if p.name == "embed.weight"]
    passes = 4 if method == "ties" else 1  # TIES' statistics passes go over the chunks too
    assert embed == [range(a, min(a + 8, 203)) for a in range(0, 203, 8)] * passes
    assert chunked == whole


def test_chunks_across_shards_and_in_another_dtype(model, tmp_path, monkeypatch):
    archive = pack(model, SETTINGS["defaults"])
    options = dict(max_shard_size=20_000, dtype="fp32")
    out = tmp_path / "whole"
    merge(MergeRequest([archive], model / "pre.safetensors", out, "ties", **options))
    monkeypatch.setattr(chunks, "WHOLE_LIMIT", 0)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)
    chunked = tmp_path / "chunked"
    merge(MergeRequest([archive], model / "pre.safetensors", chunked, "ties", **options))
    files = sorted(p.name for p in out.iterdir())
    assert len(files) > 2 and files == sorted(p.name for p in chunked.iterdir())
    for name in files:
        assert (out / name).read_bytes() == (chunked / name).read_bytes()


def test_chunks_give_the_same_bytes_on_one_thread(model, tmp_path, small_chunks):
    archive = pack(model, SETTINGS["defaults"])
    one, two = (
        merged_bytes(archive, model, tmp_path / f"{n}.safetensors", "ties", threads=n)
        for n in (1, 2)
    )
    assert one == two


@pytest.mark.parametrize("method", ["magmax", "lines"])
def test_methods_merged_by_blocks_give_their_whole_tensor_bytes(
    model, tmp_path, monkeypatch, method
):
    """MagMax and LiNeS are elementwise (per element, or one scale per tensor): merged by
    blocks and chunks, they give what their whole-tensor merge gave."""
    archive = pack(model, SETTINGS["defaults"])
    blocks = merged_bytes(archive, model, tmp_path / "blocks.safetensors", method)
    monkeypatch.setattr(REGISTRY[method], "elementwise", False)
    whole = merged_bytes(archive, model, tmp_path / "whole.safetensors", method)
    assert blocks == whole


def test_methods_that_need_whole_tensors_are_not_chunked(model, small_chunks):
    archive = pack(model, SETTINGS["defaults"])
    cases = [("ties", True), ("magmax", True), ("breadcrumbs", False), ("consensus", False)]
    for method, flat in cases:
        request = MergeRequest([archive], model / "pre.safetensors", model / "x", method)
        engine = Engine(check_request(request))
        try:
            assert (len(engine.pieces("embed.weight")) > 1) == flat
        finally:
            engine.close()


def test_chunked_merge_checks_the_pretrained_fingerprint(model, tmp_path, small_chunks):
    archive = pack(model, SETTINGS["defaults"])
    other = load_file(str(model / "pre.safetensors"))
    other["embed.weight"][200, 3] += 0.5  # a row of the last chunk
    save_file(other, str(tmp_path / "other.safetensors"))
    out = tmp_path / "out.safetensors"
    with pytest.raises(TvqError, match="different pretrained model"):
        merge(MergeRequest([archive], tmp_path / "other.safetensors", out, "task_arithmetic"))
    assert not out.exists()


def test_chunked_merge_of_a_damaged_archive_fails_without_output(model, tmp_path, small_chunks):
    archive = pack(model, SETTINGS["defaults"])
    reader = tvq_cli.open_archive(archive)
    key = sorted(s.key for s in reader.stored if s.key.endswith("embed.weight:codes"))[1]
    _, start, end = reader._offsets[key]
    reader.close()
    data = bytearray(archive.read_bytes())
    data[(start + end) // 2] ^= 0x10
    damaged = tmp_path / "damaged.tvq"
    damaged.write_bytes(bytes(data))
    out = tmp_path / "out.safetensors"
    with pytest.raises(TvqError, match="damaged"):
        merge(MergeRequest([damaged], model / "pre.safetensors", out, "task_arithmetic"))
    assert not out.exists() and not list(tmp_path.glob(".*"))


def frame_reader(frame: np.ndarray):
    at = [0]

    def read(n: int) -> np.ndarray:
        piece = frame[at[0] : at[0] + n]
        at[0] += n
        return piece

    return read


def decode_in_blocks(frame: np.ndarray, bits: int, count: int, block: int) -> np.ndarray:
    decoder = entropy.FrameDecoder(frame_reader(frame), frame.size, bits, count, "frame")
    out = np.empty(block + 8, np.uint8)
    codes = [decoder.next(min(block, count - a), out).copy() for a in range(0, count, block)]
    decoder.close()
    return np.concatenate(codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_frame_decoded_in_blocks_gives_its_codes(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, 80_000).astype(np.uint8)
    frame = np.frombuffer(entropy.encode(codes, bits, "zstd-c"), np.uint8)
    assert np.array_equal(decode_in_blocks(frame, bits, codes.size, 8_000), codes)
    assert entropy._frame_size(memoryview(frame)) == frame.size


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: f[:-1],  # the checksum cut short
        lambda f: f[:-4],  # the checksum gone
        lambda f: f[:-9],  # the last block cut short
        lambda f: np.concatenate([f, np.zeros(3, np.uint8)]),  # bytes after the frame
        lambda f: np.concatenate([f[: f.size // 2], [f[f.size // 2] ^ 0x55], f[f.size // 2 + 1 :]]),
    ],
)
@pytest.mark.parametrize("bits", [4, 8])
def test_a_damaged_frame_decoded_in_blocks_raises(damage, bits):
    codes = np.random.default_rng(1).integers(0, 1 << bits, 80_000).astype(np.uint8)
    frame = damage(np.frombuffer(entropy.encode(codes, bits, "zstd-c"), np.uint8))
    with pytest.raises(TvqError, match="damaged"):
        decode_in_blocks(frame.astype(np.uint8), bits, codes.size, 8_000)


def test_rows_written_in_pieces_are_the_tensor(tmp_path):
    tensor = torch.randn(10, 6).to(torch.bfloat16)
    specs = {"a": TensorSpec((10, 6), "BF16"), "b": TensorSpec((3,), "F32")}
    whole, pieces = tmp_path / "whole.safetensors", tmp_path / "pieces.safetensors"
    stream = SafetensorsStream(whole, specs, {"format": "pt"})
    stream.write("a", tensor)
    stream.write("b", torch.ones(3))
    stream.close()
    stream = SafetensorsStream(pieces, specs, {"format": "pt"})
    stream.write_rows("a", tensor[:4])
    with pytest.raises(InternalError):
        stream.write("a", tensor)  # rows of it are written already
    with pytest.raises(InternalError):
        stream.write_rows("a", tensor[4:, :3])
    with pytest.raises(InternalError):
        stream.write_rows("b", torch.ones(3))  # "a" is not complete
    stream.write_rows("a", tensor[4:])
    assert not stream.complete
    with pytest.raises(InternalError):
        stream.write_rows("a", tensor[:1])  # past its last row
    stream.write("b", torch.ones(3))
    assert stream.complete
    stream.close()
    assert pieces.read_bytes() == whole.read_bytes()


def test_only_archives_decodable_by_rows_are_chunked(model, small_chunks):
    """FQ stores fine-tuned weights (its task vectors need the whole pretrained tensor) and a
    searched per-tensor range is not coded by rows: both are merged whole."""
    cases = [
        ("tvq.tvq", PackOptions(), True),
        ("rtvq.tvq", PackOptions(scheme="rtvq"), True),
        ("fq.tvq", PackOptions(scheme="fq", bits=8), False),
        ("per-tensor.tvq", PackOptions(group_size=0, range="minmax", scale_bits=0), False),
    ]
    for name, options, flat in cases:
        archive = pack(model, options, name)
        request = MergeRequest([archive], model / "pre.safetensors", model / "x", "ties")
        engine = Engine(check_request(request))
        try:
            assert (len(engine.pieces("embed.weight")) > 1) == flat, name
        finally:
            engine.close()
