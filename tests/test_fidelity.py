"""Fidelity beyond the paper: range search, compact scales, budget allocation, entropy stage."""

import json

import numpy as np
import pytest
import torch
from helpers import run_cli, write_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from tvq_cli import PackOptions, TvqError, open_archive, pack
from tvq_cli.archive.format import Part, part_layout
from tvq_cli.pack import dry_run
from tvq_cli.quant import entropy, native, scale_codec, sizes
from tvq_cli.quant.quantizer import dequantize, quantize
from tvq_cli.quant.spec import QuantSpec, group_count


def _sq_error(x: torch.Tensor, spec: QuantSpec) -> float:
    x_hat = dequantize(quantize(x, spec), spec, tuple(x.shape))
    return float((x_hat.double() - x.double()).square().sum())


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 70),
    bits=st.integers(1, 8),
    group=st.sampled_from([0, 1, 7, 16, 32]),
    tail=st.floats(0.5, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_range_search_never_increases_error(rows, cols, bits, group, tail, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    x = x.sign() * x.abs().pow(tail) * 0.01  # from light to very heavy tails
    minmax, searched = QuantSpec(bits, group), QuantSpec(bits, group, "search")
    assert _sq_error(x, searched) <= _sq_error(x, minmax)
    # zero stays exactly representable
    z = x.clone()
    z[:, 0] = 0.0
    z_hat = dequantize(quantize(z, searched), searched, tuple(z.shape))
    assert torch.all(z_hat[:, 0] == 0.0)


def test_range_search_helps_on_heavy_tails():
    x = torch.distributions.Laplace(0.0, 1.0).sample((64, 256))
    for bits, most in ((2, 0.8), (3, 0.9), (4, 0.97)):
        for group in (0, 64):
            searched, minmax = QuantSpec(bits, group, "search"), QuantSpec(bits, group)
            assert _sq_error(x, searched) < most * _sq_error(x, minmax)


@pytest.mark.parametrize("scale_bits", [4, 6, 8])
def test_compact_scales_round_trip_within_stated_precision(scale_bits):
    top = 0.37
    reach = ((1 << scale_bits) - 1) / scale_codec.codes_per_octave(scale_bits)  # octaves
    steps = top * torch.pow(2.0, -torch.linspace(0, reach, 5000))
    codes = scale_codec.encode_steps(steps, top, scale_bits)
    back = scale_codec.decode_steps(codes, top, scale_bits)
    rel = (back.double() / steps.double() - 1).abs().max().item()
    assert rel <= scale_codec.max_relative_error(scale_bits) + 1e-6
    # covering codes never give a smaller step (a min-max range stays covered)
    cover = scale_codec.decode_steps(
        scale_codec.covering_codes(steps, top, scale_bits), top, scale_bits
    )
    assert torch.all(cover >= steps * (1 - 1e-6))
    # steps below the grid are clamped to its smallest step, never to zero
    tiny = scale_codec.decode_steps(
        scale_codec.encode_steps(torch.tensor([1e-30]), top, scale_bits), top, scale_bits
    )
    assert tiny.item() == pytest.approx(top * 2.0**-reach)


def test_compact_scales_are_stored_as_the_quantizer_used_them(tmp_path):
    pre, fts = _zoo_like(tmp_path, n_tasks=2)
    out = tmp_path / "a.tvq"
    pack(pre, fts, out, PackOptions(bits=3, scale_bits=5, group_size=32))
    archive = open_archive(out)
    name = "block0.weight"
    part = archive.entry(name).parts[0]
    assert (part.scale_bits, part.range) == (5, "search")
    pre_t = _load(pre)[name]
    tau = _load(fts[0])[name] - pre_t
    expected = dequantize(quantize(tau, part.spec), part.spec, tuple(tau.shape))
    assert torch.equal(archive.task_vector("t0", name), expected)
    stored = {s.key: s for s in archive.stored}
    assert stored[f"task:t0:{name}:scales"].dtype == "U8"
    assert stored[f"task:t0:{name}:superscale"].shape == (1,)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, 8),
    count=st.integers(0, 3000),
    skew=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
    codec=st.sampled_from(sizes.CODED),
)
def test_entropy_stage_round_trips_bit_exactly(bits, count, skew, seed, codec):
    rng = np.random.default_rng(seed)
    codes = np.minimum(rng.geometric(skew, count) - 1, (1 << bits) - 1).astype(np.uint8)
    frame = entropy.encode(codes, bits, codec)
    assert len(frame) <= sizes.compress_bound(count, bits)
    assert np.array_equal(entropy.decode(np.frombuffer(frame, np.uint8), bits, count), codes)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, 8),
    rows=st.integers(0, 5),
    cols=st.integers(1, 40),
    group=st.integers(0, 50),
    seed=st.integers(0, 2**31 - 1),
)
def test_centered_codes_are_undone_exactly(bits, rows, cols, group, seed):
    """zstd-c stores (code - zero) mod 2^bits per group, groups as the format defines them
    (short last groups of a row included); adding the zero-point back gives the codes."""
    rng = np.random.default_rng(seed)
    shape = (rows, cols)
    codes = rng.integers(0, 1 << bits, rows * cols).astype(np.uint8)
    zeros = rng.integers(0, 1 << bits, group_count(shape, group)).astype(np.uint8)
    centered = entropy.center(codes, zeros, shape, group, bits)
    assert centered.max(initial=0) < 1 << bits
    assert np.array_equal(entropy.uncenter(centered.copy(), zeros, shape, group, bits), codes)
    with pytest.MonkeyPatch.context() as patch:  # numpy's way, where groups do not tile rows
        patch.setattr(native, "lib", None)
        assert np.array_equal(entropy.uncenter(centered.copy(), zeros, shape, group, bits), codes)
    if rows and group and cols > group:  # the second group of the first row
        assert centered[group] == (int(codes[group]) - int(zeros[1])) % (1 << bits)


@pytest.mark.parametrize("codec", sizes.CODED)
def test_entropy_stage_detects_a_damaged_stream(codec):
    codes = (np.random.default_rng(0).geometric(0.6, 5000) - 1).clip(0, 3).astype(np.uint8)
    frame = bytearray(entropy.encode(codes, 2, codec))
    assert len(frame) < 5000 * 2 / 8  # skewed codes compress
    for pos in (len(frame) // 2, len(frame) - 2):
        bad = bytearray(frame)
        bad[pos] ^= 0x5A
        with pytest.raises(TvqError, match="damaged"):
            entropy.decode(bytes(bad), 2, 5000)
    with pytest.raises(TvqError, match="damaged"):
        entropy.decode(bytes(frame[:-5]), 2, 5000)
    with pytest.raises(TvqError):
        entropy.decode(bytes(frame), 2, 4000)  # wrong count


def test_damaged_entropy_coded_archive_is_detected(tmp_path):
    pre, fts = _zoo_like(tmp_path, n_tasks=2)
    out = tmp_path / "a.tvq"
    pack(pre, fts, out, PackOptions(bits=2))
    archive = open_archive(out)
    key = "task:t1:block1.weight:codes"
    _, start, end = archive._offsets[key]
    data = bytearray(out.read_bytes())
    data[(start + end) // 2] ^= 0xFF  # offsets are absolute in the file
    out.write_bytes(bytes(data))
    with pytest.raises(TvqError, match="damaged"):
        open_archive(out).task_vector("t1", "block1.weight")


def test_part_options_round_trip_in_the_header_and_v1_parts_still_read():
    part = Part("task:a", 3, 64, "search", 6, "zstd", 1234)
    assert Part.from_json(json.loads(json.dumps(part.to_json()))) == part
    assert Part("task:a", 3, 64).to_json() == ["task:a", 3, 64]
    assert Part.from_json(["task:a", 3, 64]) == Part("task:a", 3, 64)
    with pytest.raises(TvqError):
        Part.from_json(["task:a", 3, 64, {"range": "magic"}])
    with pytest.raises(TvqError):
        Part.from_json(["task:a", 3, 64, {"colour": 1}])


# --- the budget allocator --------------------------------------------------------------------


def _zoo_like(root, n_tasks=3):
    """Heterogeneous task vectors: tensors whose deltas differ in scale and tail weight."""
    gen = torch.Generator().manual_seed(7)
    pre = {
        "block0.weight": torch.randn(64, 128, generator=gen) * 0.1,
        "block1.weight": torch.randn(128, 64, generator=gen) * 0.1,
        "block2.weight": torch.randn(96, 96, generator=gen) * 0.1,
        "head.weight": torch.randn(10, 64, generator=gen) * 0.1,
        "head.bias": torch.zeros(10),
    }
    scales = {
        "block0.weight": 0.02,
        "block1.weight": 0.002,
        "block2.weight": 0.01,
        "head.weight": 0.05,
        "head.bias": 0.01,
    }
    pre_path = write_checkpoint(root / "pre.safetensors", pre)
    fts = []
    for t in range(n_tasks):
        ft = {}
        for name, w in pre.items():
            noise = torch.randn(w.shape, generator=gen)
            if name == "block2.weight":  # very heavy tails
                noise = noise * torch.randn(w.shape, generator=gen) ** 2
            ft[name] = w + scales[name] * noise
        fts.append(write_checkpoint(root / f"t{t}.safetensors", ft))
    return pre_path, fts


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _rel_error(out, pre, fts):
    report = json.loads(run_cli("inspect", out, "--json", "--against", pre, *fts)[1])
    return report["error"]["rel_l2"]


@pytest.mark.parametrize("scheme", ["tvq", "rtvq"])
def test_allocator_never_exceeds_budget_and_beats_uniform_bits(tmp_path, scheme):
    pre, fts = _zoo_like(tmp_path)
    params = sum(t.numel() for t in _load(pre).values())
    uniform = {}
    for bits in range(1, 6):
        out = tmp_path / f"u{bits}.tvq"
        options = PackOptions(scheme=scheme, bits=bits, base_bits=bits, offset_bits=bits)
        size = pack(pre, fts, out, options).size_bytes
        uniform[bits] = (8 * size / (3 * params), _rel_error(out, pre, fts))
    for budget in (2.75, 3.5):
        out = tmp_path / f"b{budget}.tvq"
        code, stdout, stderr = run_cli(
            "pack", "--pretrained", pre, *fts, "--out", out, "--scheme", scheme, "--budget", budget
        )
        assert code == 0, stderr
        size = out.stat().st_size
        assert size <= budget * 3 * params / 8
        assert "allocation for" in stdout
        dry = dry_run(pre, fts, PackOptions(scheme=scheme, budget=budget))
        assert dry.size_bytes == size
        fitting = [err for bpw, err in uniform.values() if bpw <= budget]
        assert _rel_error(out, pre, fts) < min(fitting)


def _stored_bytes(archive, name: str) -> int:
    """Bytes the archive spends on one tensor's parts (a low-rate record's own length)."""
    entry = archive.entry(name)
    return sum(
        sum(s.nbytes for s in part_layout(p, entry)) if p.dense else archive.record(p, entry).nbytes
        for p in entry.parts
    )


def test_allocator_spends_more_bits_where_they_remove_more_error(tmp_path):
    pre, fts = _zoo_like(tmp_path)
    out = tmp_path / "b.tvq"
    pack(pre, fts, out, PackOptions(budget=2.5, weighting="uniform"))
    names = ("block0.weight", "block1.weight")
    by_relative = {n: _stored_bytes(open_archive(out), n) for n in names}
    pack(pre, fts, out, PackOptions(budget=2.5), overwrite=True)
    archive = open_archive(out)
    by_squared = {n: _stored_bytes(archive, n) for n in names}
    # by squared error the tiny-delta tensor is worth little; by relative error it counts
    assert by_squared["block1.weight"] < by_squared["block0.weight"]
    assert by_relative["block1.weight"] > by_squared["block1.weight"]
    report = json.loads(run_cli("inspect", out, "--json")[1])
    assert sum(q["parameters"] for q in report["quantization"]) == 3 * sum(
        e.numel for e in archive.header.tensors if e.parts
    )


def test_budget_too_small_is_one_clear_error(tmp_path):
    pre, fts = _zoo_like(tmp_path)
    out = tmp_path / "b.tvq"
    code, _, stderr = run_cli("pack", "--pretrained", pre, *fts, "--out", out, "--budget", 0.01)
    assert code == 2 and "too small" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.glob(".b.tvq*")) == []
    code, _, stderr = run_cli(
        "pack", "--pretrained", pre, *fts, "--dry-run", "--weighting", "x", "--budget", 2
    )
    assert code == 2 and "weighting" in stderr


def test_paper_settings_stay_available(tmp_path):
    pre, fts = _zoo_like(tmp_path)
    out = tmp_path / "paper.tvq"
    options = PackOptions(bits=2, group_size=0, range="minmax", scale_bits=0, codec="raw")
    pack(pre, fts, out, options)
    part = open_archive(out).header.tensors[0].parts[0]
    assert part == Part("task:t0", 2, 0)
    best = tmp_path / "best.tvq"
    params = sum(t.numel() for t in _load(pre).values())
    pack(pre, fts, best, PackOptions(budget=8 * out.stat().st_size / (3 * params)))
    assert best.stat().st_size <= out.stat().st_size
    assert _rel_error(best, pre, fts) < 0.5 * _rel_error(out, pre, fts)
