from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvq_cli.errors import TvqError
from tvq_cli.quant import range_search
from tvq_cli.quant.quantizer import dequantize, quantize
from tvq_cli.quant.spec import QuantSpec, group_count


def _round_trip(x: torch.Tensor, spec: QuantSpec):
    q = quantize(x, spec)
    return q, dequantize(q, spec, tuple(x.shape))


def _step_per_element(q, spec: QuantSpec, shape) -> torch.Tensor:
    """Each element's quantization step 1/scale: dequantize code 1 with zero-point 0."""
    numel = torch.Size(shape).numel()
    unit = type(q)(torch.ones(numel, dtype=torch.uint8), q.scales, torch.zeros_like(q.zeros))
    return dequantize(unit, spec, shape)


@settings(max_examples=150, deadline=None)
@given(
    bits=st.integers(1, 8),
    group=st.sampled_from([0, 1, 3, 8, 16, 100]),
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-6, 1e-3, 1.0, 50.0]),
)
def test_error_is_at_most_half_a_step(bits, group, rows, cols, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * scale
    spec = QuantSpec(bits, group)
    q, x_hat = _round_trip(x, spec)
    step = _step_per_element(q, spec, (rows, cols))
    assert q.scales.numel() == group_count((rows, cols), group)
    assert int(q.codes.max()) <= 2**bits - 1
    assert torch.all((x_hat - x).abs() <= step / 2 * (1 + 1e-5) + 1e-12)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group", [0, 4, 7])
def test_zero_maps_to_zero(bits, group):
    x = torch.randn(5, 14)
    x[:, ::3] = 0.0
    _, x_hat = _round_trip(x, QuantSpec(bits, group))
    assert torch.all(x_hat[:, ::3] == 0.0)


def test_zero_representable_when_range_excludes_it():
    x = torch.full((2, 8), 5.0) + torch.rand(2, 8)
    x[0, 0] = 0.0
    _, x_hat = _round_trip(x, QuantSpec(3, 0))
    assert x_hat[0, 0] == 0.0


@pytest.mark.parametrize("value", [0.0, 2.5, -1.0])
def test_constant_groups_have_no_nan(value):
    x = torch.full((3, 16), value)
    q, x_hat = _round_trip(x, QuantSpec(2, 8))
    assert torch.isfinite(q.scales).all()
    assert torch.isfinite(x_hat).all()
    assert torch.allclose(x_hat, x)


@pytest.mark.parametrize("range_method", ["minmax", "search"])
def test_short_last_group_matches_explicit_grouping(range_method):
    """A row of 10 with groups of 4 is quantized as [4, 4, 2]."""
    x = torch.randn(2, 10)
    spec = QuantSpec(3, 4, range_method)
    _, x_hat = _round_trip(x, spec)
    for row in range(2):
        for start in (0, 4, 8):
            piece = x[row, start : start + 4].reshape(1, -1)
            _, piece_hat = _round_trip(piece, QuantSpec(3, 0, range_method))
            assert torch.allclose(x_hat[row, start : start + 4], piece_hat.reshape(-1))


@pytest.mark.parametrize(
    "spec", [QuantSpec(3, 10**6), QuantSpec(3, 10**6, "search", 6)], ids=["minmax", "defaults"]
)
def test_a_group_longer_than_a_row_is_the_row(spec):
    x = torch.randn(5, 12)
    row = replace(spec, group_size=12)
    q, by_row = quantize(x, spec), quantize(x, row)
    for field in ("codes", "scales", "zeros"):
        assert torch.equal(getattr(q, field), getattr(by_row, field)), field
    if spec.scale_bits:
        assert torch.equal(q.step_codes, by_row.step_codes)
    assert torch.equal(dequantize(q, spec, (5, 12)), dequantize(by_row, row, (5, 12)))


@pytest.mark.parametrize("group", [3, 5, 12, 10**6])
def test_the_search_sees_each_element_once(monkeypatch, group):
    """The work is bounded by the tensor, whatever the group size: no row is padded to G
    (a huge G once made every row G elements long: minutes for a small model)."""
    seen = []
    search = range_search.quantize_groups

    def counted(groups, *args):
        seen.append(groups.numel())
        return search(groups, *args)

    monkeypatch.setattr(range_search, "quantize_groups", counted)
    x = torch.randn(7, 12)
    quantize(x, QuantSpec(4, group, "search", 6))
    assert sum(seen) == x.numel()


def test_more_bits_less_error():
    x = torch.randn(64, 64)
    errors = [(_round_trip(x, QuantSpec(b, 64))[1] - x).norm() for b in range(1, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))


def test_reference_formula_per_tensor():
    """Matches the TVQ reference code literally when the range straddles zero."""
    x = torch.tensor([[-0.3, 0.1, 0.25, -0.05]])
    bits = 2
    scale = (2**bits - 1) / (x.max() - x.min())
    zp = -torch.round(scale * x.min())
    q = torch.clamp(torch.round(scale * x + zp), 0, 2**bits - 1)
    expected = (q - zp) / scale
    _, x_hat = _round_trip(x, QuantSpec(bits, 0))
    assert torch.allclose(x_hat, expected)


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_bits(bits):
    with pytest.raises(TvqError):
        QuantSpec(bits, 0)
