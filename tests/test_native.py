"""The native range-search kernel gives exactly what its torch reference gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import finetune, run_cli, synthetic_model, write_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

import tvq_cli
from tvq_cli.pack import PackOptions
from tvq_cli.quant import bitpack, kernel, native, range_search, rans
from tvq_cli.quant.spec import QuantSpec

# Without a build, the comparisons below would compare the references with themselves: they are
# skipped, and this test fails, so a missing build never passes unnoticed.
NEEDS_NATIVE = pytest.mark.skipif(not native.built(), reason="the native kernels were not built")


def test_native_kernels_are_built() -> None:
    assert native.built(), (
        "tvq_cli.quant._native was not built: install with a C compiler (pip install -e .)"
    )
    assert rans.built(), (
        "tvq_cli.quant._rans was not built: install with a C compiler (pip install -e .)"
    )


@pytest.fixture(params=["avx512", "generic"])
def simd(request):
    """Run a test with the AVX-512 path, then with the generic one (skipped where the CPU has
    no AVX-512): both must give the reference's bytes."""
    if native.lib is None:
        yield None
        return
    if request.param == "avx512" and native.lib.simd() != "avx512":
        pytest.skip("this CPU has no AVX-512")
    native.lib.simd(request.param == "avx512")
    yield request.param
    native.lib.simd(True)


def _both(groups: torch.Tensor, spec: QuantSpec):
    """(native, torch reference) results of `quantize_groups` on the same groups."""
    lo, hi = range_search.group_ranges(groups)
    fallback, top = range_search.grid_top(lo, hi, spec)
    compiled = range_search.quantize_groups(groups, lo, hi, spec, fallback, top)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "lib", None)
        lo_ref, hi_ref = range_search.group_ranges(groups)
        assert torch.equal(lo, lo_ref) and torch.equal(hi, hi_ref)
        reference = range_search.quantize_groups(groups, lo, hi, spec, fallback, top)
    return compiled, reference


def _data(kind: str, groups: int, width: int, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "heavy":  # a product of normals: task-vector-like tails
        x = torch.randn(groups, width, generator=gen) * torch.randn(groups, width, generator=gen)
    elif kind == "grid":  # few distinct values: many exact ties between candidates
        x = torch.randint(-3, 4, (groups, width), generator=gen).float() / 4
    else:  # mostly exact zeros, as bf16 fine-tunes give
        x = torch.randn(groups, width, generator=gen)
        x[torch.rand(groups, width, generator=gen) < 0.8] = 0.0
    x = x * scale
    x[0] = 0.0  # an all-zero group
    return x


@NEEDS_NATIVE
@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    width=st.sampled_from([1, 5, 8, 13, 64, 128, 300]),
    groups=st.integers(1, 40),
    search=st.booleans(),
    scale_bits=st.sampled_from([0, 4, 6, 8]),
    kind=st.sampled_from(["heavy", "grid", "sparse"]),
    scale=st.sampled_from([1e-40, 1e-30, 1e-5, 1.0, 1e4]),  # 1e-40: subnormal spans
    seed=st.integers(0, 2**16),
)
def test_native_matches_reference(bits, width, groups, search, scale_bits, kind, scale, seed):
    for wide in [True, False] if native.lib.simd() == "avx512" else [False]:
        native.lib.simd(wide)
        try:
            _check_native_matches(bits, width, groups, search, scale_bits, kind, scale, seed)
        finally:
            native.lib.simd(True)


def _check_native_matches(bits, width, groups, search, scale_bits, kind, scale, seed):
    spec = QuantSpec(bits, width, "search" if search else "minmax", scale_bits)
    x = _data(kind, groups, width, scale, seed)
    compiled, reference = _both(x, spec)
    assert torch.equal(compiled.codes, reference.codes)
    assert torch.equal(compiled.scales, reference.scales)
    assert torch.equal(compiled.zeros, reference.zeros)
    if scale_bits:
        assert torch.equal(compiled.step_codes, reference.step_codes)
        assert compiled.super_scale == reference.super_scale
    else:
        assert compiled.step_codes is None and reference.step_codes is None


@NEEDS_NATIVE
def test_search_beats_minmax_on_heavy_tails() -> None:
    """Not only equal to the reference: the native search picks shrunk steps where they help."""
    x = _data("heavy", 256, 128, 1e-3, 1)
    spec = QuantSpec(3, 128, "search", 0)
    compiled, _ = _both(x, spec)
    lo, hi = range_search.group_ranges(x)
    minmax = 7 / (hi - lo)
    assert (compiled.scales[1:] > minmax[1:] * 1.01).float().mean() > 0.5


@NEEDS_NATIVE
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("minus_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_widen_matches_torch(dtype, minus_dtype, bad) -> None:
    gen = torch.Generator().manual_seed(5)
    raw = torch.randn(37, 24, generator=gen).to(dtype)
    raw[0, :4] = torch.tensor([6e-8, -3e-5, 65504.0, 0.0])  # fp16 subnormals and extremes
    if bad is not None:
        raw[20, 3] = bad
    minus = None
    if minus_dtype is not None:
        minus = torch.randn(37, 24, generator=gen).to(minus_dtype)
    compiled, reference = torch.empty(37 * 24), torch.empty(37 * 24)
    finite = kernel.widen_into(raw, compiled, minus)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "lib", None)
        assert kernel.widen_into(raw, reference, minus) == finite == (bad is None)
    assert torch.equal(compiled.nan_to_num(), reference.nan_to_num())


@NEEDS_NATIVE
@pytest.mark.parametrize(
    "scheme, dtype, options",
    [
        ("tvq", torch.bfloat16, {}),
        ("tvq", torch.bfloat16, {"bits": 3}),  # zstd-c: 3-bit codes centered in 4-bit symbols
        ("tvq", torch.float32, {"bits": 8}),  # zstd-c at 8 bits: packed apart from the codes
        ("tvq", torch.float32, {"bits": 2, "group_size": 0}),  # one zero-point per tensor
        ("tvq", torch.float16, {"codec": "raw", "bits": 3}),
        ("tvq", torch.float32, {"scale_bits": 0}),
        ("tvq", torch.bfloat16, {"group_size": 0, "range": "minmax", "scale_bits": 0}),
        ("fq", torch.float16, {"bits": 8}),
        ("rtvq", torch.bfloat16, {}),
    ],
)
def test_archives_do_not_depend_on_the_kernel(
    tmp_path: Path, scheme, dtype, options, simd, monkeypatch
) -> None:
    pre = synthetic_model(0, dtype)
    pre_path = write_checkpoint(tmp_path / "pre.safetensors", pre)
    fts = [write_checkpoint(tmp_path / f"ft{i}.safetensors", finetune(pre, i)) for i in range(3)]
    options = PackOptions(scheme=scheme, **{"group_size": 16, **options})
    compiled, reference = tmp_path / "native.tvq", tmp_path / "reference.tvq"
    tvq_cli.pack(pre_path, fts, compiled, options)
    monkeypatch.setattr(native, "lib", None)
    tvq_cli.pack(pre_path, fts, reference, options)
    assert compiled.read_bytes() == reference.read_bytes()


@NEEDS_NATIVE
@pytest.mark.parametrize(
    "bad",
    [
        {"width": 0},
        {"width": 3},  # does not divide the values
        {"kind": 7},
        {"levels": 256},
        {"lo": torch.zeros(3)},
        {"out": torch.zeros(3, dtype=torch.uint8)},
        {"scratch": torch.zeros(2)},  # smaller than a chunk of groups
        {"coarse": torch.tensor([0, 9], dtype=torch.int32)},  # candidate out of range
        {"center": 5},  # centered on more bits than are stored
    ],
    ids=["width", "divides", "kind", "levels", "lo", "out", "scratch", "coarse", "center"],
)
def test_native_checks_its_arguments(bad) -> None:
    plan = {
        "levels": 15,
        "factors": torch.tensor([1.0, 0.5]),
        "shifts": torch.empty(0, dtype=torch.int32),
        "table": torch.empty(0),
        "coarse": torch.tensor([0, 1], dtype=torch.int32),
        "fine": torch.tensor([-1, 1], dtype=torch.int32),
        "margin": 1.0,
        "flat_scale": 1.0,
        "max_scale": 2.0**100,
    }
    args = {
        "src": torch.zeros(8, dtype=torch.bfloat16),
        "kind": native.BF16,
        "minus": torch.zeros(8),
        "mkind": native.F32,
        "width": 4,
        "lo": torch.zeros(2),
        "hi": torch.zeros(2),
        "ranged": False,
        "plan": None,
        "scratch": torch.zeros(8),
        "codes": torch.zeros(8, dtype=torch.uint8),
        "bits": 4,
        "out": torch.zeros(4, dtype=torch.uint8),
        "scales": torch.zeros(2),
        "zeros": torch.zeros(2, dtype=torch.uint8),
        "steps": torch.empty(0, dtype=torch.uint8),
        "center": 0,
    }

    def call(args: dict, plan: dict) -> bool:
        def raw(v):
            if not isinstance(v, torch.Tensor):
                return v
            return v.view(torch.uint8).numpy() if v.dtype == torch.bfloat16 else v.numpy()

        values = {**args, "plan": tuple(raw(v) for v in plan.values())}
        return native.lib.encode(*[raw(v) for v in values.values()])

    assert call(args, plan)  # the untouched arguments are fine
    broken_args = {**args, **{k: v for k, v in bad.items() if k in args}}
    broken_plan = {**plan, **{k: v for k, v in bad.items() if k in plan}}
    with pytest.raises(ValueError):
        call(broken_args, broken_plan)


@pytest.mark.parametrize(
    "options",
    [
        PackOptions(),
        PackOptions(scale_bits=0),
        PackOptions(range="minmax", scale_bits=0, codec="raw"),
        PackOptions(group_size=0, range="minmax", scale_bits=0),
    ],
    ids=["defaults", "fp32-scales", "paper-groups", "paper"],
)
def test_subnormal_task_vectors_round_trip(tmp_path: Path, options) -> None:
    """Every span subnormal: levels / span overflowed float32, so pack raised (compact scales)
    or wrote infinite scales that the reader then rejected as damage."""
    pre = {"w": torch.zeros(4, 256)}
    ft = {"w": torch.randn(4, 256, generator=torch.Generator().manual_seed(3)) * 1e-40}
    pre_path = write_checkpoint(tmp_path / "pre.safetensors", pre)
    ft_path = write_checkpoint(tmp_path / "ft.safetensors", ft)
    tvq_cli.pack(pre_path, [ft_path], tmp_path / "a.tvq", options)
    archive = tvq_cli.open_archive(tmp_path / "a.tvq")
    archive.verify()
    restored = archive.task_vector(archive.tasks[0], "w")
    assert (restored - ft["w"]).abs().max() <= ft["w"].abs().max()


@NEEDS_NATIVE
def test_pack_says_when_the_native_kernel_is_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tvq_cli.cli.pack.show_progress", lambda quiet: not quiet)  # a terminal
    pre = synthetic_model(0)
    pre_path = write_checkpoint(tmp_path / "pre.safetensors", pre)
    ft_path = write_checkpoint(tmp_path / "ft.safetensors", finetune(pre, 0))
    args = ["pack", "--pretrained", pre_path, ft_path]
    code, _, err = run_cli(*args, "--out", tmp_path / "a.tvq")
    assert code == 0 and "native kernel" not in err
    monkeypatch.setattr(native, "lib", None)
    code, _, err = run_cli(*args, "--out", tmp_path / "b.tvq")
    assert code == 0 and "the native kernels were not built" in err
    assert (tmp_path / "a.tvq").read_bytes() == (tmp_path / "b.tvq").read_bytes()


@NEEDS_NATIVE
@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), blocks=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_native_bit_packing_matches_numpy(bits, blocks, seed) -> None:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, blocks * 8, dtype=np.uint8)
    compiled, reference = np.empty(blocks * bits, np.uint8), np.empty(blocks * bits, np.uint8)
    scratch = np.empty(blocks, np.uint64)
    bitpack.pack_into(codes.copy(), bits, compiled, scratch)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "lib", None)
        bitpack.pack_into(codes.copy(), bits, reference, scratch)
        assert np.array_equal(bitpack.unpack_bits(compiled, bits, codes.size), codes)
    assert np.array_equal(compiled, reference)
