"""The native merge kernels give exactly what their torch references give, and so do merges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import finetune, synthetic_model, write_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

import tvq_cli
from tvq_cli.merge import MergeRequest, merge
from tvq_cli.merge.base import MergeContext
from tvq_cli.merge.methods.ties import Ties
from tvq_cli.merge.topk import StreamingKth
from tvq_cli.pack import PackOptions
from tvq_cli.quant import bitpack, kernel, native
from tvq_cli.quant.spec import QuantSpec

NEEDS_NATIVE = pytest.mark.skipif(not native.built(), reason="the native kernels were not built")


def _paths() -> list[bool]:
    """The vector paths to try: AVX-512 (where the CPU has it) and the generic one."""
    if native.lib is None:
        return []
    return [True, False] if native.lib.simd() == "avx512" else [False]


def both(fn):
    """fn() with each native vector path, then with the torch reference; all results."""
    results = []
    for wide in _paths():
        native.lib.simd(wide)
        try:
            results.append(fn())
        finally:
            native.lib.simd(True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "lib", None)
        results.append(fn())
    return results


@NEEDS_NATIVE
@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    group=st.sampled_from([0, 8, 32, 128, 1024]),
    first=st.integers(0, 3000),
    count=st.integers(1, 3000),
    seed=st.integers(0, 2**16),
)
def test_dequantize_span_matches_reference(bits, group, first, count, seed) -> None:
    rng = np.random.default_rng(seed)
    end = first + count
    groups = 1 if group == 0 else -(-end // group)
    codes = torch.from_numpy(rng.integers(0, 1 << bits, count, dtype=np.uint8))
    zeros = torch.from_numpy(rng.integers(0, 1 << bits, groups, dtype=np.uint8))
    scales = torch.from_numpy(rng.lognormal(0, 3, groups).astype(np.float32))
    spec = QuantSpec(bits, group)

    def run():
        out = torch.empty(count)
        kernel.dequantize_span(codes, first, spec, scales, zeros, out)
        return out

    results = both(run)
    assert all(torch.equal(r, results[-1]) for r in results)
    if group:  # the same values as dequantizing whole groups
        whole = torch.empty(groups * group)
        padded = torch.zeros(groups * group, dtype=torch.uint8)
        padded[first:end] = codes
        kernel.dequantize_into(padded, spec, scales, zeros, whole)
        assert torch.equal(results[0], whole[first:end])


@NEEDS_NATIVE
def test_dequantize_rejects_codes_above_levels() -> None:
    codes = np.array([0, 16], np.uint8)
    zeros, scales, out = np.zeros(1, np.uint8), np.ones(1, np.float32), np.empty(2, np.float32)
    with pytest.raises(ValueError):
        native.lib.dequantize(codes, 0, 0, zeros, scales, 15, out)


@NEEDS_NATIVE
@pytest.mark.parametrize("tasks", [1, 3, 4, 50])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_weighted_sum_matches_reference(tasks, scale) -> None:
    gen = torch.Generator().manual_seed(tasks)
    taus = torch.randn(tasks, 5000, generator=gen) * torch.randn(tasks, 5000, generator=gen)
    for weights in (torch.ones(tasks), torch.rand(tasks, generator=gen) * 3):
        results = both(lambda w=weights: kernel.weighted_sum(taus, w, scale))
        assert all(torch.equal(r, results[-1]) for r in results)


def _ties(tasks: int, weights: torch.Tensor, thresholds: torch.Tensor, majority: float) -> Ties:
    ctx = MergeContext([f"t{i}" for i in range(tasks)], weights, ["w"])
    method = Ties({"lambda": 0.7}, ctx)
    method._thresholds, method._majority = thresholds, majority
    return method


@NEEDS_NATIVE
@pytest.mark.parametrize("tasks", [1, 2, 4, 9])
@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("majority", [1.0, -1.0, 0.0])
def test_ties_matches_reference(tasks, unit, majority) -> None:
    gen = torch.Generator().manual_seed(tasks)
    taus = torch.randint(-3, 4, (tasks, 3000), generator=gen).float()  # exact ties and zeros
    taus[:, ::7] *= torch.rand(tasks, 1, generator=gen)
    taus[0, :5] = -0.0
    weights = torch.ones(tasks) if unit else torch.rand(tasks, generator=gen) + 0.1
    thresholds = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 0.0, 1.5, 2.5, 1.0][:tasks])
    method = _ties(tasks, weights, thresholds, majority)
    merged = both(lambda: method.merge("w", taus))
    assert all(torch.equal(r, merged[-1]) for r in merged)
    signs = both(lambda: method._signs(taus))
    assert len(set(signs)) == 1


@NEEDS_NATIVE
def test_streaming_kth_native_matches_reference() -> None:
    rng = np.random.default_rng(4)
    chunks = [torch.from_numpy(rng.standard_cauchy(n).astype(np.float32)) for n in (999, 64, 7)]
    chunks.append(torch.tensor([0.0, -0.0, 0.5, -0.5]))

    def kth(k: int) -> float:
        finder = StreamingKth()
        for c in chunks:
            finder.observe_high(c)
        finder.select(k)
        for c in chunks:
            finder.observe_low(c)
        return finder.value()

    for k in (1, 2, 500, 1074):
        assert len(set(both(lambda k=k: kth(k)))) == 1


@NEEDS_NATIVE
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_into_rounds_like_torch(base_dtype, out_dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    base = (torch.randn(4096, generator=gen) * 10).to(base_dtype)
    delta = torch.randn(4096, generator=gen) * torch.logspace(-30, 5, 4096)
    delta[:4] = torch.tensor([1e38, -1e38, 70000.0, 6e-8])  # overflow, fp16 range, subnormal

    def run():
        out = torch.empty(4096, dtype=out_dtype)
        assert kernel.add_into(base, delta, out)
        return out

    results = both(run)
    assert all(torch.equal(r.view(torch.uint8), results[-1].view(torch.uint8)) for r in results)
    bad = base.clone()
    bad[7] = float("inf")
    assert not kernel.add_into(bad, delta, torch.empty(4096, dtype=out_dtype))


@NEEDS_NATIVE
@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(1, 2000), seed=st.integers(0, 2**16))
def test_native_unpacking_matches_numpy(bits, count, seed) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, count, dtype=np.uint8)
    stream = bitpack.pack_bits(codes, bits)
    out = np.empty(-(-count // 8) * 8, np.uint8)
    results = both(lambda: bitpack.unpack_bits(stream, bits, count).copy())
    results.append(bitpack.unpack_bits(stream, bits, count, out))
    assert all(np.array_equal(r, codes) for r in results)


@NEEDS_NATIVE
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "average"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merges_do_not_depend_on_the_kernels(tmp_path: Path, method, dtype) -> None:
    pre = synthetic_model(0, dtype)
    pre_path = write_checkpoint(tmp_path / "pre.safetensors", pre)
    fts = [write_checkpoint(tmp_path / f"ft{i}.safetensors", finetune(pre, i)) for i in range(3)]
    archive = tmp_path / "a.tvq"
    tvq_cli.pack(pre_path, fts, archive, PackOptions(group_size=16))

    def run():
        out = tmp_path / "out.safetensors"
        merge(MergeRequest([archive], pre_path, out, method, force=True))
        return out.read_bytes()

    results = both(run)
    assert all(r == results[-1] for r in results)


@NEEDS_NATIVE
def test_coded_kernels_check_their_arguments() -> None:
    codes, zeros = np.array([0, 3, 15, 2], np.uint8), np.zeros(1, np.uint8)
    scales, weights = np.ones(1, np.float32), np.ones(1, np.float32)
    base, out = np.zeros(4, np.float32), np.empty(4, np.float32)
    empty = np.empty(0, np.float32)

    def coded(codes=codes, levels=15, n=4, zeros=zeros, op=kernel.SUM):
        return native.lib.coded(
            [codes], [zeros], [scales], [0], [levels], 0, n, op, weights, 1.0, empty, False,
            0.0, base, native.F32, out, native.F32,
        )  # fmt: skip

    assert coded() == 1 and np.array_equal(out, codes.astype(np.float32))
    for bad in ({"levels": 7}, {"n": 5}, {"zeros": np.zeros(0, np.uint8)}, {"op": 1}):
        with pytest.raises(ValueError):
            coded(**bad)
    counts = np.zeros(1 << 16, np.int64)
    with pytest.raises(ValueError):
        native.lib.code_histogram(codes, 0, 0, zeros, scales, 7, -1, counts)
