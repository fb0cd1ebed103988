"""Reference delta compressors, written from their papers' descriptions (data-free variants).

Each per-tensor compressor takes one tensor's task vector `tau` (numpy float32, any shape) and
returns `(tau_hat, nbytes)`: the reconstruction and the exact payload bytes of the storage layout
stated below. A benchmark adds the bytes of the container they are stored in (benchmarks/
lowrate.py: a tvq archive's, with one frame per task; tests: `archive_bytes`, a bare safetensors
file with the tensor list), so "bits per weight" counts every byte as it does for tvq.

A tensor of shape (..., C) is viewed as prod(...) rows of C; a 1-D tensor is one row. Positions,
where stored, are Golomb-Rice coded gaps between kept entries (best parameter per tensor, 5 bits
for it): an exact, realizable code within a few percent of the bitmap entropy.

- BitDelta (Liu et al. 2024), per tensor or per row: sign(tau) x mean abs(tau) (sign(0) = +1);
  ceil(n/8) bytes of signs + an fp16 scale (per row: 2 x rows).
- ComPEFT (Yadav et al. 2023): the top-k magnitudes as sign x one scale, the mean abs of the
  kept (the MSE optimum; the paper tunes alpha x std on validation data); a u32 count, the
  gaps, one bit per kept entry, an fp16 scale.
- DARE (Yu et al. 2024) as storage: keep each entry with probability p, store tau / p; the
  positions come from a seeded generator (free); 8 bytes (seed, count) + fp16 per kept entry.
- top-k + b-bit: the top-k; sign + a (b-1)-bit uniform magnitude on [smallest kept, largest];
  a u32 count, the gaps, b bits per kept entry, two fp32.
- UltraDelta (Wang et al. 2025): per-tensor min-max b-bit quantization; variance-based mixed
  sparsity (parameter thirds by std: s + 0.01, s, the rest so that the mean is s); per value of
  the grid the same random fraction dropped; x 1/(1-s); across tasks x min_j T_j / T_i, T the
  sum of nuclear norms; a u32 count, the gaps, b bits per kept entry, two fp32; 8 bytes a task.

Data-free deviations: BitDelta's scale distillation and ComPEFT's validation-tuned alpha need
data (their data-free starting points are used); UltraDelta compresses every tensor (the paper:
attention and MLP matrices only), and entries exactly zero in tau stay zero (its min-max grid
has no 0, which would give untouched embedding rows a nonzero code).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
from safetensors.numpy import save

Tensors = dict[str, np.ndarray]  # tensor name -> array
Tasks = dict[str, Tensors]  # task -> its task vector


# --- byte accounting ---------------------------------------------------------------------------
def rice_bits(gaps: np.ndarray) -> int:
    """Exact bits of Golomb-Rice coding of `gaps` (>= 0) with the best parameter (5 bits)."""
    if gaps.size == 0:
        return 5
    gaps = gaps.astype(np.int64)
    best = None
    for k in range(32):
        bits = int((gaps >> k).sum()) + gaps.size * (1 + k) + 5
        best = bits if best is None else min(best, bits)
        if (gaps >> k).max() == 0:
            break
    return best


def positions_bytes(mask: np.ndarray) -> int:
    index = np.flatnonzero(mask.reshape(-1))
    gaps = np.diff(np.concatenate([[-1], index])) - 1
    return (rice_bits(gaps) + 7) // 8


def archive_bytes(shapes: dict[str, tuple[int, ...]], payload: dict[str, int]) -> int:
    """A real safetensors file: one U8 frame per task (8 bytes of framing + its payload), the
    tensor list and the frames' checksums in the header."""
    header = {
        "tensors": [{"name": k, "shape": list(s), "dtype": "F32"} for k, s in shapes.items()],
        "frames": {t: n + 8 for t, n in payload.items()},
    }
    sums = {"__header__": "00000000", **{f"frame:{t}": "00000000" for t in payload}}
    frames = {f"frame:{t}": np.zeros(n + 8, np.uint8) for t, n in payload.items()}
    meta = {"tvq": json.dumps(header, separators=(",", ":")), "tvq.checksums": json.dumps(sums)}
    return len(save(frames, metadata=meta))


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(1, -1) if x.ndim < 2 else x.reshape(-1, x.shape[-1])


def _top(x: np.ndarray, keep: float, order: np.ndarray | None) -> np.ndarray:
    """The round(keep * n) largest magnitudes (`order`: a cached descending argsort)."""
    flat = np.abs(x.reshape(-1))
    k = int(round(keep * flat.size))
    mask = np.zeros(flat.size, bool)
    if k > 0:
        mask[order[:k] if order is not None else np.argpartition(-flat, k - 1)[:k]] = True
    return mask.reshape(x.shape)


# --- the compressors ---------------------------------------------------------------------------
def bitdelta(tau: np.ndarray, per_row: bool = False) -> tuple[np.ndarray, int]:
    sign = np.where(tau >= 0, 1.0, -1.0).astype(np.float32)
    if per_row:
        rows = _rows(tau)
        alpha = np.abs(rows).mean(axis=1, keepdims=True).astype(np.float16).astype(np.float32)
        return (_rows(sign) * alpha).reshape(tau.shape), (tau.size + 7) // 8 + 2 * rows.shape[0]
    alpha = np.float32(np.float16(np.abs(tau).mean() if tau.size else 0.0))
    return sign * alpha, (tau.size + 7) // 8 + 2


def compeft(tau: np.ndarray, keep: float, order=None) -> tuple[np.ndarray, int]:
    mask = _top(tau, keep, order)
    kept = int(mask.sum())
    alpha = float(np.float16(np.abs(tau[mask]).mean() if kept else 0.0))
    hat = np.where(mask, np.sign(tau) * alpha, 0.0).astype(np.float32)
    return hat, 4 + positions_bytes(mask) + (kept + 7) // 8 + 2


def dare(tau: np.ndarray, keep: float, seed: int = 0) -> tuple[np.ndarray, int]:
    mask = np.random.default_rng(seed).random(tau.shape) < keep
    hat = np.zeros_like(tau)
    hat[mask] = tau[mask].astype(np.float16).astype(np.float32) / keep
    return hat, 8 + 2 * int(mask.sum())


def topk_bits(tau: np.ndarray, keep: float, bits: int, order=None) -> tuple[np.ndarray, int]:
    mask = _top(tau, keep, order)
    kept = int(mask.sum())
    hat = np.zeros_like(tau)
    if kept:
        v = tau[mask]
        mag = np.abs(v).astype(np.float64)
        low, high = float(mag.min()), float(mag.max())
        levels = (1 << (bits - 1)) - 1
        if levels == 0 or high <= low:
            rec = np.full_like(mag, mag.mean())
        else:
            step = (high - low) / levels
            rec = low + np.round((mag - low) / step) * step
        hat[mask] = (np.sign(v) * rec).astype(np.float32)
    return hat, 4 + positions_bytes(mask) + (kept * bits + 7) // 8 + 8


class UltraDelta:
    """UltraDelta with the work that does not depend on the sparsity s done once: each
    tensor's b-bit min-max codes, its groups of equal codes, one seeded random order per group
    (pruning at rate r drops the first round(r * size) of each group's order)."""

    def __init__(self, taus: Tasks, bits: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.taus, self.bits = taus, bits
        self.values: dict[tuple[str, str], np.ndarray] = {}
        self.groups: dict[tuple[str, str], list[np.ndarray]] = {}
        for task, tensors in taus.items():
            for name, x in tensors.items():
                flat = np.where(x.reshape(-1) == 0, 0.0, _minmax(x, bits)).astype(np.float32)
                self.values[task, name] = flat
                nonzero = np.unique(flat[flat != 0])
                self.groups[task, name] = [
                    rng.permutation(np.flatnonzero(flat == v)) for v in nonzero
                ]

    def run(
        self, s: float, step: float = 0.01, hats_too: bool = True
    ) -> tuple[Tasks, dict[str, int]]:
        """At sparsity `s`: (reconstructions, payload bytes per task); `hats_too=False` only
        counts bytes (no reconstructions, no nuclear norms: for searching s)."""
        hats: Tasks = {}
        payload: dict[str, int] = {}
        for task, tensors in self.taus.items():
            rates = _mixed_sparsity(tensors, s, step)
            hats[task], payload[task] = {}, 8
            for name, x in tensors.items():
                flat = self.values[task, name]
                current = float((flat == 0).mean())
                rate = max(0.0, (rates[name] - current) / (1 - current)) if current < 1 else 0.0
                keep = flat != 0
                for members in self.groups[task, name]:
                    keep[members[: int(round(members.size * rate))]] = False
                kept = int(keep.sum())
                payload[task] += 4 + positions_bytes(keep) + (kept * self.bits + 7) // 8 + 8
                if hats_too:
                    hat = np.where(keep, flat, 0.0) / (1 - s)
                    hats[task][name] = hat.astype(np.float32).reshape(x.shape)
        if hats_too and len(hats) > 1:  # trace-norm-guided rescaling across tasks
            norms = {
                t: sum(
                    float(np.linalg.svd(h, compute_uv=False).sum())
                    for h in v.values()
                    if h.ndim == 2
                )
                for t, v in hats.items()
            }
            low = min(norms.values())
            for t in hats:
                factor = low / norms[t] if norms[t] > 0 else 1.0
                hats[t] = {k: h * factor for k, h in hats[t].items()}
        return hats, payload


def _minmax(x: np.ndarray, bits: int) -> np.ndarray:
    flat = x.reshape(-1)
    low, high = float(flat.min()), float(flat.max())
    if high <= low:
        return flat.copy()
    levels = (1 << bits) - 1
    return np.round((flat - low) / (high - low) * levels) / levels * (high - low) + low


def _mixed_sparsity(tensors: Tensors, s: float, step: float) -> dict[str, float]:
    """UltraDelta's variance-based sparsity per tensor: the third of the parameters with the
    lowest std gets s + step, the middle third s, the top third what makes the mean s."""
    sizes = {k: v.size for k, v in tensors.items()}
    total = sum(sizes.values())
    order = sorted(tensors, key=lambda k: float(tensors[k].std()) if tensors[k].size > 1 else 0.0)
    rates, seen, low, mid = {}, 0, 0, 0
    for k in order:
        seen += sizes[k]
        if seen <= total / 3:
            rates[k], low = s + step, low + sizes[k]
        elif seen <= 2 * total / 3:
            rates[k], mid = s, mid + sizes[k]
    high = total - low - mid
    top = (s * total - s * mid - (s + step) * low) / high if high else s
    for k in order:
        rates.setdefault(k, min(0.99, max(0.0, top)))
    return rates


# --- running a method at a rate ----------------------------------------------------------------
def per_tensor(fn: Callable, taus: Tasks, orders=None, **kw) -> tuple[Tasks, dict[str, int]]:
    """A per-tensor compressor on every tensor of every task: (hats, payload bytes per task)."""
    hats: Tasks = {}
    payload: dict[str, int] = {}
    for task, tensors in taus.items():
        hats[task], payload[task] = {}, 0
        for name, x in tensors.items():
            extra = {"order": orders[task, name]} if orders is not None else {}
            hats[task][name], nbytes = fn(x, **kw, **extra)
            payload[task] += nbytes
    return hats, payload


def magnitude_orders(taus: Tasks) -> dict[tuple[str, str], np.ndarray]:
    return {
        (t, k): np.argsort(-np.abs(x.reshape(-1)), kind="stable")
        for t, tensors in taus.items()
        for k, x in tensors.items()
    }


def at_rate(
    make: Callable[[float], tuple[Tasks, dict[str, int]]],
    bpw: Callable[[dict[str, int]], float],
    rate: float,
    low: float = 1e-5,
    high: float = 1.0,
) -> tuple[Tasks, dict[str, int], float]:
    """The largest keep fraction (or 1 - sparsity) whose archive is at most `rate` bits per
    weight, by bisection: (hats, payload, fraction); the smallest tried when none fits."""
    hats, payload = make(high)
    if bpw(payload) <= rate:
        return hats, payload, high
    best = None
    for _ in range(22):
        mid = math.sqrt(low * high)
        hats, payload = make(mid)
        if bpw(payload) <= rate:
            low, best = mid, (hats, payload, mid)
        else:
            high = mid
    return best if best is not None else (*make(low), low)
