"""Each merge method against a direct numpy computation written here, defaults included."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tvq_cli.errors import TvqError
from tvq_cli.merge.base import MergeContext
from tvq_cli.merge.methods import method_class
from tvq_cli.merge.topk import StreamingKth

SHAPES = {"layers.0.w": (6, 10), "layers.1.w": (4, 10), "layers.2.b": (10,), "head.w": (3, 5)}
T = 3


def make_taus(seed: int = 0, n_tasks: int = T) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.laplace(size=(n_tasks, *shape)).astype(np.float32)
        for name, shape in SHAPES.items()
    }


def run_method(name, taus, options=None, weights=None, targets=(), seed=0):
    """Drive a method through the streaming protocol: statistics passes, then merge."""
    n = next(iter(taus.values())).shape[0]
    ctx = MergeContext(
        tasks=[f"t{i}" for i in range(n)],
        weights=torch.tensor(weights if weights else [1.0] * n),
        tensor_names=list(taus),
        seed=seed,
        targets=list(targets),
    )
    method = method_class(name)(options or {}, ctx)
    for index in range(method.stat_passes):
        for tensor, value in taus.items():
            method.observe(index, tensor, torch.from_numpy(value))
        method.end_pass(index)
    out = {}
    for tensor, value in taus.items():
        merged = method.merge(tensor, torch.from_numpy(value))
        out[tensor] = [m.numpy() for m in merged] if isinstance(merged, list) else merged.numpy()
    return out


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_default_and_weights():
    taus = make_taus()
    for name, out in run_method("task_arithmetic", taus).items():
        close(out, 0.3 * taus[name].sum(0))
    w = [1.0, 0.5, 2.0]
    out = run_method("task_arithmetic", taus, {"lambda": 0.7}, weights=w)
    for name in taus:
        expected = 0.7 * sum(w[t] * taus[name][t] for t in range(T))
        close(out[name], expected)


def test_average_default_and_weights():
    taus = make_taus()
    for name, out in run_method("average", taus).items():
        close(out, taus[name].mean(0))
    out = run_method("average", taus, weights=[1.0, 3.0, 0.0])
    for name in taus:
        close(out[name], (taus[name][0] + 3 * taus[name][1]) / 4)


def ties_reference(taus, lam=0.3, topk=20.0, scope="global"):
    names = list(taus)
    out = {}
    groups = [names] if scope == "global" else [[n] for n in names]
    for group in groups:
        flat = np.concatenate([taus[n].reshape(T, -1) for n in group], axis=1)
        n = flat.shape[1]
        k = n - int(topk / 100 * n)
        thr = np.sort(np.abs(flat), axis=1)[:, k - 1] if k >= 1 else np.zeros(T)
        trimmed = flat * (np.abs(flat) >= thr[:, None])
        sign = np.sign(trimmed.sum(0))
        majority = np.sign(sign.sum())
        sign[sign == 0] = majority
        agree = (np.sign(trimmed) == sign) & (trimmed != 0)
        count = agree.sum(0)
        mean = np.where(count > 0, (trimmed * agree).sum(0) / np.maximum(count, 1), 0.0)
        offset = 0
        for name in group:
            size = taus[name][0].size
            out[name] = lam * mean[offset : offset + size].reshape(taus[name].shape[1:])
            offset += size
    return out


def test_ties_default_is_global_top20():
    taus = make_taus(1)
    out = run_method("ties", taus)
    expected = ties_reference(taus)
    for name in taus:
        close(out[name], expected[name])
    # per-tensor trimming gives a different result on this data
    per_tensor = ties_reference(taus, scope="tensor")
    assert any(not np.allclose(out[n], per_tensor[n]) for n in taus)


def test_ties_tensor_scope_and_options():
    taus = make_taus(2)
    out = run_method("ties", taus, {"topk_scope": "tensor", "topk": 50, "lambda": 1.0})
    expected = ties_reference(taus, lam=1.0, topk=50, scope="tensor")
    for name in taus:
        close(out[name], expected[name])


def test_ties_sign_tie_goes_to_majority():
    # element 0: +1 and -1 cancel exactly; the model-wide majority of elected signs is negative
    taus = {"w": np.array([[[1.0, -2.0, -3.0]], [[-1.0, -2.0, -3.0]]], dtype=np.float32)}
    out = run_method("ties", taus, {"topk": 100, "lambda": 1.0})
    close(out["w"], np.array([[-1.0, -2.0, -3.0]]))


def test_streaming_kth_is_exact():
    rng = np.random.default_rng(3)
    chunks = [rng.standard_cauchy(n).astype(np.float32) for n in (1000, 7, 5000)]
    chunks.append(np.zeros(300, np.float32))
    chunks.append(np.repeat(np.float32(0.125), 50))
    allv = np.sort(np.abs(np.concatenate(chunks)))
    for k in (1, 17, 300, 301, 3000, allv.size):
        kth = StreamingKth()
        for c in chunks:
            kth.observe_high(torch.from_numpy(c))
        kth.select(k)
        for c in chunks:
            kth.observe_low(torch.from_numpy(c))
        assert kth.value() == allv[k - 1]


def test_dare_is_seeded_drops_p_and_rescales():
    rng = np.random.default_rng(4)
    taus = {"w": rng.normal(size=(1, 100, 100)).astype(np.float32) + 5.0}
    a = run_method("dare", taus, {"p": 0.3, "lambda": 1.0}, seed=7)["w"]
    b = run_method("dare", taus, {"p": 0.3, "lambda": 1.0}, seed=7)["w"]
    c = run_method("dare", taus, {"p": 0.3, "lambda": 1.0}, seed=8)["w"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    kept = a != 0
    assert abs(1 - kept.mean() - 0.3) < 0.02  # 10,000 draws: 4 sigma is ~0.018
    close(a[kept], taus["w"][0][kept] / 0.7)


def test_dare_defaults_then_task_arithmetic_and_ties():
    taus = make_taus(5)
    no_drop = run_method("dare", taus, {"p": 0.0})
    for name in taus:
        close(no_drop[name], 0.3 * taus[name].sum(0))
    ties = run_method("dare", taus, {"p": 0.0, "then": "ties"})
    expected = ties_reference(taus, lam=0.5, topk=100)
    for name in taus:
        close(ties[name], expected[name])


def test_breadcrumbs_per_row():
    taus = make_taus(6)
    gamma, beta, lam = 0.1, 0.3, 0.3
    out = run_method("breadcrumbs", taus, {"gamma": gamma, "beta": beta})
    for name, value in taus.items():
        n = value.shape[-1]
        rows = value.reshape(T, -1, n)
        kept = np.zeros_like(rows)
        for t in range(T):
            for r in range(rows.shape[1]):
                order = np.argsort(-np.abs(rows[t, r]), kind="stable")
                keep = order[int(gamma * n) : int(gamma * n) + int(beta * n)]
                kept[t, r, keep] = rows[t, r, keep]
        close(out[name], lam * kept.sum(0).reshape(value.shape[1:]))


def test_breadcrumbs_defaults():
    rng = np.random.default_rng(7)
    taus = {"w": rng.normal(size=(2, 3, 1000)).astype(np.float32)}
    out = run_method("breadcrumbs", taus)["w"]
    for r in range(3):
        expected = np.zeros(1000)
        for t in range(2):
            order = np.argsort(-np.abs(taus["w"][t, r]), kind="stable")[6:156]
            expected[order] += taus["w"][t, r, order]
        close(out[r], 0.3 * expected)


def test_magmax_later_task_wins_ties():
    taus = make_taus(8)
    taus["head.w"][2] = -taus["head.w"][0]  # equal magnitudes: task 2 must win over task 0
    taus["head.w"][1] = 0
    out = run_method("magmax", taus)
    for name, value in taus.items():
        flat = value.reshape(T, -1)
        expected = np.empty(flat.shape[1])
        for i in range(flat.shape[1]):
            best = 0
            for t in range(T):
                if abs(flat[t, i]) >= abs(flat[best, i]):
                    best = t
            expected[i] = flat[best, i]
        close(out[name], 0.5 * expected.reshape(value.shape[1:]))


def tall_mask(value, lam):
    total = value.sum(0)
    return np.abs(value) > lam * np.abs(total - value)


def test_tall_one_model_per_task():
    taus = make_taus(9)
    out = run_method("tall", taus, targets=[0, 2])
    for name, value in taus.items():
        masks = tall_mask(value, 0.6)
        close(out[name][0], masks[0] * value.sum(0))
        close(out[name][1], masks[2] * value.sum(0))


def test_consensus_defaults_and_k():
    taus = make_taus(10)
    for options, lam, k in (({}, 0.3, 2), ({"k": 3, "mask_lambda": 0.2, "lambda": 1.0}, 1.0, 3)):
        out = run_method("consensus", taus, options)
        mask_lambda = options.get("mask_lambda", 0.6)
        for name, value in taus.items():
            votes = tall_mask(value, mask_lambda).sum(0)
            close(out[name], lam * (votes >= k) * value.sum(0))


def test_lines_scales_by_block():
    taus = make_taus(11)
    out = run_method("lines", taus)  # blocks 0..2 -> L = 3; alpha = 1/3, beta = 0.5
    scale = {
        "layers.0.w": 1 / 3,
        "layers.1.w": 1 / 3 + 0.25,
        "layers.2.b": 1 / 3 + 0.5,
        "head.w": 1 / 3,
    }
    for name, value in taus.items():
        close(out[name], scale[name] * value.sum(0))
    out = run_method("lines", taus, {"alpha": 0.1, "beta": 1.0})
    close(out["layers.1.w"], 0.6 * taus["layers.1.w"].sum(0))


def test_emr_rescalers_over_the_whole_model():
    taus = make_taus(12)
    flags, unis = {}, {}
    own, masked = np.zeros(T), np.zeros(T)
    for name, value in taus.items():
        flag = np.where(value.sum(0) > 0, 1.0, -1.0)
        agree = value * flag > 0
        uni = flag * np.max(np.abs(value) * agree, axis=0)
        flags[name], unis[name] = flag, uni
        for t in range(T):
            own[t] += np.abs(value[t]).sum()
            masked[t] += np.abs(agree[t] * uni).sum()
    out = run_method("emr", taus, targets=[0, 1, 2])
    for name, value in taus.items():
        for t in range(T):
            mask = value[t] * flags[name] > 0
            close(out[name][t], own[t] / masked[t] * mask * unis[name])


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("ties", {"topk": 0}, "--topk must be in (0, 100]"),
        ("ties", {"topk": 101}, "--topk must be in (0, 100]"),
        ("ties", {"topk_scope": "layer"}, "--topk-scope must be one of global, tensor"),
        ("dare", {"p": 1.0}, "--p must be in [0, 1)"),
        ("dare", {"topk": 20}, "--topk applies only with --then ties"),
        ("consensus", {"k": 4}, "more than the 3 tasks"),
        ("consensus", {"k": 1.5}, "whole number"),
        ("breadcrumbs", {"beta": 0.9, "gamma": 0.2}, "at most 1"),
        ("task_arithmetic", {"lambda": float("inf")}, "finite"),
        ("magmax", {"topk": 20}, "does not take --topk"),
        ("nope", {}, "unknown merge method 'nope'"),
    ],
)
def test_bad_options_are_clear_errors(method, options, message):
    with pytest.raises(TvqError, match=re.escape(message)):
        run_method(method, make_taus(), options)
