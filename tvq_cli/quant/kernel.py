"""Block-sized, allocation-free steps of the pack and merge pipelines, in caller-owned buffers.

Why buffers: on the target machine a fresh multi-megabyte tensor costs a page fault per 4 KiB,
so allocation, not arithmetic, was the main cost of whole-tensor ops on big tensors. Where the
native kernels are built, a block of raw inputs (bf16, fp16 or fp32, minus the pretrained
block) is widened, range-searched, quantized and bit-packed in one native pass, one L1-sized
chunk of groups at a time; the torch references below compute the same bytes step by step.
Dequantization is the same math, op for op, as `quantizer.dequantize`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..tensors import all_finite
from . import entropy, native, range_search
from .bitpack import pack_into
from .spec import QuantSpec

KINDS = {torch.float32: native.F32, torch.bfloat16: native.BF16, torch.float16: native.F16}
_EMPTY = np.empty(0, np.uint8)


def _raw(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous tensor, as the kernels read them."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _native_inputs(raw: torch.Tensor, minus: torch.Tensor | None) -> tuple | None:
    """(src, kind, minus, minus kind) for the kernels, or None where they cannot read these."""
    if native.lib is None or raw.dtype not in KINDS or not raw.is_contiguous():
        return None
    if minus is None:
        return _raw(raw), KINDS[raw.dtype], _EMPTY, native.NONE
    if minus.dtype not in KINDS or not minus.is_contiguous() or minus.numel() != raw.numel():
        return None
    return _raw(raw), KINDS[raw.dtype], _raw(minus), KINDS[minus.dtype]


def widen_into(raw: torch.Tensor, out: torch.Tensor, minus: torch.Tensor | None = None) -> bool:
    """``out = float32(raw) - float32(minus)`` (`minus` optional) for contiguous blocks of equal
    size; returns whether every value of `out` is finite. One native pass (widen, subtract and
    check together) where built; torch's ops otherwise."""
    inputs = _native_inputs(raw, minus)
    if inputs is not None:
        return native.lib.widen(*inputs, out.reshape(-1).numpy())
    view = out.view(raw.shape)
    view.copy_(raw)  # widen, then subtract: a mixed-dtype sub is not vectorized
    if minus is not None:
        view.sub_(minus.view(raw.shape).to(torch.float32))
    return all_finite(out)


def _grouped(x: torch.Tensor, width: int) -> torch.Tensor:
    return x.view(-1, width)


def ranges_into(
    raw: torch.Tensor,
    minus: torch.Tensor | None,
    width: int,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scratch: torch.Tensor,
) -> bool:
    """Each group of `width` values of ``raw - minus``: its min-max range (with 0) into `lo`,
    `hi`; returns whether every value is finite. `scratch`: fp32, at least the block's size."""
    inputs = _native_inputs(raw, minus)
    if inputs is not None:
        return native.lib.ranges(*inputs, width, lo.numpy(), hi.numpy(), scratch.numpy())
    x = scratch[: raw.numel()]
    finite = widen_into(raw, x, minus)
    a, b = range_search.group_ranges(_grouped(x, width))
    lo.copy_(a)
    hi.copy_(b)
    return finite


class BlockCoder:
    """Codes blocks of one part: range search, quantization and bit-packing at `bits` per
    code (the stored layout's width), given the part's per-tensor `grid_top` values; with
    `center`, the packed codes are centered on their zero-points as codec zstd-c stores them
    (`entropy.center`), while `codes` keep their values."""

    def __init__(self, spec: QuantSpec, fallback: float, top: float, bits: int, center: bool):
        self.spec, self.fallback, self.top, self.bits = spec, fallback, top, bits
        self.center = center
        self.plan = range_search.native_plan(spec, fallback, top) if native.lib else None

    def encode(
        self,
        raw: torch.Tensor,
        minus: torch.Tensor | None,
        width: int,
        lo: torch.Tensor,
        hi: torch.Tensor,
        ranged: bool,
        scratch: torch.Tensor,
        codes: torch.Tensor,
        out: np.ndarray,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        steps: torch.Tensor | None,
    ) -> bool:
        """Quantize the groups of `width` values of ``raw - minus`` (`lo`, `hi`: their ranges
        if `ranged`, else filled here) into `scales`, `zeros`, `steps` and the packed codes
        `out`; `codes` (uint8, the block's size rounded up to 8) keeps the codes. Returns
        whether every value is finite."""
        n = raw.numel()
        inputs = _native_inputs(raw, minus) if self.plan is not None else None
        if inputs is not None:
            return native.lib.encode(
                *inputs,
                width,
                lo.numpy(),
                hi.numpy(),
                ranged,
                self.plan,
                scratch.numpy(),
                _EMPTY if self.bits == 8 and not self.center else codes[:n].numpy(),
                self.bits,
                out,
                scales.numpy(),
                zeros.numpy(),
                _EMPTY if steps is None else steps.numpy(),
                self.spec.bits if self.center else 0,
            )
        x = scratch[:n]
        finite = widen_into(raw, x, minus)
        groups = _grouped(x, width)
        if not ranged:
            a, b = range_search.group_ranges(groups)
            lo.copy_(a)
            hi.copy_(b)
        q = range_search.quantize_groups(groups, lo, hi, self.spec, self.fallback, self.top)
        codes[:n] = q.codes.view(-1)
        scales.copy_(q.scales)
        zeros.copy_(q.zeros)
        if steps is not None:
            steps.copy_(q.step_codes)
        padded = -(-n // 8) * 8
        work = codes[:padded].numpy().copy()
        if self.center:
            shape = (n // width, width)
            work[:n] = entropy.center(work[:n], zeros.numpy(), shape, width, self.spec.bits)
        work[n:] = 0
        packed = np.empty(padded * self.bits // 8, np.uint8)
        pack_into(work, self.bits, packed, np.empty(padded // 8, np.uint64))
        out[:] = packed[: out.size]
        return finite


def dequantize_into(
    codes: torch.Tensor,
    spec: QuantSpec,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """`dequantize` of whole groups (or of one per-tensor group) into float32 `out` (same
    element count as `codes`)."""
    out.copy_(codes)
    values = out.view(-1, spec.group_size) if spec.group_size else out.view(1, -1)
    values.sub_(zeros.to(torch.float32)[:, None]).div_(scales[:, None])


def dequantize_span(
    codes: torch.Tensor,
    first: int,
    spec: QuantSpec,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """`dequantize_into` of elements [first, first + len(codes)) of a tensor whose groups tile
    its rows: any span, whole groups or not (merge's column blocks). Native where built (a
    table of each group's values, the same divisions); torch's ops otherwise."""
    size = spec.group_size
    if native.lib is not None:
        native.lib.dequantize(
            codes.numpy(), first, size, zeros.numpy(), scales.numpy(), spec.levels, out.numpy()
        )
        return
    n = codes.numel()
    group = torch.arange(first, first + n) // size if size else torch.zeros(n, dtype=torch.long)
    out.copy_(codes)
    out.sub_(zeros[group].to(torch.float32)).div_(scales[group])


def add_into(base: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> bool:
    """``out = out.dtype(float32(base) + delta)`` (rounded to nearest even) for contiguous
    blocks; returns whether every value of `base` is finite. One native pass where built."""
    if native.lib is not None and base.dtype in KINDS and out.dtype in KINDS:
        delta = delta.contiguous().numpy()
        return native.lib.finish(_raw(base), KINDS[base.dtype], delta, _raw(out), KINDS[out.dtype])
    values = base.to(torch.float32)
    if not all_finite(values):
        return False
    out.copy_(torch.add(values, delta))
    return True


def weighted_sum(taus: torch.Tensor, weights: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * sum_t weights[t] * taus[t]`` over the first dimension, summed in task order
    with a product and a sum per task (no fused multiply-add): the same value on a block as
    on the whole tensor, with or without the native kernels."""
    tasks = taus.shape[0]
    if native.lib is not None and taus.dtype == torch.float32 and taus.is_contiguous():
        out = torch.empty(taus.shape[1:])
        w = weights.to(torch.float32).contiguous()
        native.lib.scaled_sum(taus.numpy(), tasks, w.numpy(), scale, out.numpy())
        return out
    total = taus[0] * weights[0]
    for t in range(1, tasks):
        total += taus[t] * weights[t]
    return total.mul_(scale)


MAX_COUNTED_LEVELS = 31  # codes of up to 5 bits are counted by value (native code_histogram)


def count_magnitudes(
    codes: torch.Tensor,
    first: int,
    spec: QuantSpec,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bin: int,
    counts: np.ndarray,
) -> bool:
    """Add the magnitudes of the values `dequantize_span` would give to `counts` (65,536
    int64) by the high 16 bits of their float32 pattern (`bin` < 0), or inside high bin
    `bin` by the low 16 bits (merge's top-k), counting each group's codes by value. False
    (nothing counted) where the native kernels are missing or codes are wider than 5 bits."""
    if native.lib is None or spec.levels > MAX_COUNTED_LEVELS:
        return False
    native.lib.code_histogram(
        codes.numpy(), first, spec.group_size, zeros.numpy(), scales.numpy(), spec.levels, bin,
        counts,
    )  # fmt: skip
    return True


class CodedTasks:
    """Task vectors kept as codes: (codes of the whole tensor, spec, scales, zeros) each, with
    the arrays the native kernels take made once per tensor."""

    def __init__(self, tasks: list[tuple[torch.Tensor, QuantSpec, torch.Tensor, torch.Tensor]]):
        self.tasks = tasks
        self.arrays = (
            [codes.numpy() for codes, _, _, _ in tasks],
            [zeros.numpy() for _, _, _, zeros in tasks],
            [scales.numpy() for _, _, scales, _ in tasks],
            [spec.group_size for _, spec, _, _ in tasks],
            [spec.levels for _, spec, _, _ in tasks],
        )


SUM, TIES, SIGNS = 0, 1, 2  # the native `coded` kernel's operations


def coded_merge_into(
    coded: CodedTasks,
    first: int,
    base: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
    ties: tuple[torch.Tensor, bool, float] | None = None,
) -> bool:
    """``out = out.dtype(base + merged)`` for elements [first, first + len(out)) of coded task
    vectors (values as `dequantize_span` gives them), merged as `weighted_sum(values, weights,
    scale)`, or with `ties` = (thresholds, unit weights, majority) as TIES' merge times
    `scale`: the same values as those steps on blocks of rows, in one native pass without
    them. Native only (callers check `native.lib`); returns whether `base` is finite."""
    thresholds, unit, majority = ties if ties is not None else (_NO_THRESHOLDS, False, 0.0)
    return bool(
        native.lib.coded(
            *coded.arrays, first, out.numel(), SUM if ties is None else TIES,
            _f32(weights), scale, _f32(thresholds), unit, majority,
            _raw(base), KINDS[base.dtype], _raw(out), KINDS[out.dtype],
        )
    )  # fmt: skip


def coded_signs(
    coded: CodedTasks, first: int, n: int, weights: torch.Tensor, thresholds: torch.Tensor
) -> int:
    """TIES' sum of elected signs over elements [first, first + n) of coded task vectors
    (native only)."""
    unit = bool((weights == 1).all())
    return native.lib.coded(
        *coded.arrays, first, n, SIGNS, _f32(weights), 1.0, _f32(thresholds), unit, 0.0,
        _EMPTY, native.F32, _EMPTY_F32, native.F32,
    )  # fmt: skip


_NO_THRESHOLDS = torch.empty(0)
_EMPTY_F32 = np.empty(0, np.float32)


def _f32(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.float32).contiguous().numpy()
