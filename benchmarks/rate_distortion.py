"""Rate-distortion of tvq's quantizers: error vs effective bits per weight, every byte counted.

Writes the tables into docs/fidelity.md (between the BENCHMARK markers) and the plot into
docs/rd_curve.png. Two data sets: the example zoo's real task vectors (8 fine-tunes of the
digits MLP, `tvq_cli.zoo`; built into a temporary folder unless `--zoo DIR` names one), and
synthetic heavy-tailed task vectors (3 tasks, 8 tensors of 256x512, per-row scales spread over
two decades, Gaussian-scale-mixture deltas). A few minutes on a laptop CPU.
Usage: PYTHONPATH=. python benchmarks/rate_distortion.py [--zoo DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tvq_cli import PackOptions, TvqError, inspect_archive, pack  # noqa: E402
from tvq_cli.archive.format import Part  # noqa: E402
from tvq_cli.archive.parts import stored_codes  # noqa: E402
from tvq_cli.quant import entropy, native, sizes  # noqa: E402
from tvq_cli.quant.quantizer import dequantize, quantize  # noqa: E402
from tvq_cli.quant.range_search import quantize_searched  # noqa: E402
from tvq_cli.quant.spec import QuantSpec  # noqa: E402
from tvq_cli.zoo import build_zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import range_search_v1  # noqa: E402
from doc_sections import write_section  # noqa: E402
from paper_settings import PAPER  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "fidelity.md"
PNG = ROOT / "docs" / "rd_curve.png"
BUDGETS = (2.0, 2.5, 3.0, 3.5, 4.0, 4.5)
TARGET = 1.5  # the target: rel-L2 <= 1.5 x 2^-R
BUDGET_CURVE = "all together: --budget R"  # the curve the target is checked on


def make_synthetic(root: Path, tasks: int = 3, tensors: int = 8) -> tuple[Path, list[Path]]:
    gen = torch.Generator().manual_seed(0)
    pre = {f"layer{i}.weight": torch.randn(256, 512, generator=gen) * 0.05 for i in range(tensors)}
    pre["head.bias"] = torch.zeros(512)
    save_file(pre, str(root / "pre.safetensors"))
    fts = []
    for t in range(tasks):
        ft = {}
        for i, (name, w) in enumerate(pre.items()):
            rows = torch.exp(torch.randn(w.shape[0], 1, generator=gen) * 1.0)  # row scales
            mix = torch.randn(w.shape, generator=gen) * torch.randn(w.shape, generator=gen).abs()
            layer_scale = 1e-3 * (1 + i)  # later layers move more
            ft[name] = w + layer_scale * (mix * rows if w.dim() == 2 else mix)
        fts.append(root / f"task{t}.safetensors")
        save_file(ft, str(fts[-1]))
    return root / "pre.safetensors", fts


def quantized_share(pre: Path, fts: list[Path]) -> float:
    """Fraction of sum ||tau||^2 in the tensors tvq quantizes (the rest is stored exactly)."""
    base = load_file(str(pre))
    total = quant = 0.0
    for ft in fts:
        for name, w in load_file(str(ft)).items():
            sq = float((w.double() - base[name].double()).square().sum())
            total += sq
            quant += sq if w.dim() >= 2 else 0.0
    return quant / total


def measure(pre: Path, fts: list[Path], out: Path, options: PackOptions, share: float) -> tuple:
    """(R all bytes, rel-L2, R of the quantized tensors' codes + scales, their rel-L2)."""
    pack(pre, fts, out, options, overwrite=True)
    report = inspect_archive(out, against=(pre, fts))
    b = report["bytes"]
    payload = 8 * (b["codes"] + b["scales"]) / (report["parameters"]["quantized"] * len(fts))
    err = report["error"]["rel_l2"]
    return report["bits_per_weight"], err, payload, err / share**0.5


def rd_curves(pre: Path, fts: list[Path], work: Path) -> tuple[dict[str, list[tuple]], dict]:
    """Every scheme's points, and the budgets the settings could not reach (with why)."""
    share = quantized_share(pre, fts)
    curves: dict[str, list[tuple]] = {}
    infeasible: dict[str, str] = {}
    out = work / "a.tvq"

    def run(label: str, **kw) -> None:
        record(curves, infeasible, label, (pre, fts, out, share), **kw)

    for bits in (2, 3, 4, 5):
        run("paper: per-tensor min-max", bits=bits, **PAPER)
        run("+ range search only", bits=bits, **{**PAPER, "range": "search"})
        run(
            "+ compact scales only (G64, 6-bit)",
            bits=bits,
            **{**PAPER, "group_size": 64, "scale_bits": 6},
        )
        run("+ entropy stage only", bits=bits, **{**PAPER, "codec": "zstd"})
        run("all, uniform bits (defaults)", bits=bits)
    for budget in BUDGETS:
        run("+ budget allocation only", budget=budget, **PAPER)
        run(BUDGET_CURVE, budget=budget)
    return curves, infeasible


def record(curves: dict, infeasible: dict, label: str, where: tuple, **options) -> None:
    """Measure one setting into `curves[label]`, or note why it could not be packed (an
    unreachable `--budget`) under `infeasible["label @ budget"]`. `where`: measure's
    (pre, fts, out, share)."""
    pre, fts, out, share = where
    try:
        curves.setdefault(label, []).append(measure(pre, fts, out, PackOptions(**options), share))
    except TvqError as exc:
        infeasible[f"{label} @ {options.get('budget')}"] = str(exc)


def coded_bytes(q, spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """Bytes of a part's codes with the default codec (zstd-c)."""
    part = Part("task:t", spec.bits, spec.group_size, codec=sizes.DEFAULT_CODEC)
    return len(stored_codes(part, shape, q))


def group_sweep(x: torch.Tensor) -> list[tuple]:
    """error x 2^R per (group size, scale bits) on one tensor, codes entropy-coded or not."""
    rows = []
    n = x.numel()
    for bits in (2, 3, 4):
        for group in (16, 32, 64, 128, 256):
            for scale_bits in (0, 4, 6, 8):
                spec = QuantSpec(bits, group, "search", scale_bits)
                q = quantize(x, spec)
                err = float((dequantize(q, spec, tuple(x.shape)) - x).norm() / x.norm())
                groups = q.zeros.numel()
                meta = groups * ((scale_bits or 32) + bits) + (32 if scale_bits else 0)
                coded = 8 * coded_bytes(q, spec, tuple(x.shape))
                rows.append(
                    (bits, group, scale_bits, err, (n * bits + meta) / n, (coded + meta) / n)
                )
    return rows


def _best_seconds(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _torch_reference(x: torch.Tensor, spec: QuantSpec):
    """`quantize_searched` as it runs where the native kernel was not built."""
    lib, native.lib = native.lib, None
    try:
        return quantize_searched(x, spec)
    finally:
        native.lib = lib


def timings(x: torch.Tensor) -> list[tuple[str, float, float]]:
    """(step, seconds per million weights, x min-max): range search before/after; zstd."""
    per_m = 1e6 / x.numel()
    minmax = _best_seconds(lambda: quantize(x, QuantSpec(3, 128))) * per_m
    out = [("quantize, min-max, fp32 scales", minmax, 1.0)]
    for label, fn, spec in (
        ("range search round 1, fp32 scales", range_search_v1.quantize_searched, (3, 128, 0)),
        ("range search round 1, 6-bit scales", range_search_v1.quantize_searched, (3, 128, 6)),
        ("range search, torch reference, fp32 scales", _torch_reference, (3, 128, 0)),
        ("range search, torch reference, 6-bit scales", _torch_reference, (3, 128, 6)),
        ("range search, native kernel, fp32 scales", quantize_searched, (3, 128, 0)),
        ("range search, native kernel, 6-bit scales", quantize_searched, (3, 128, 6)),
    ):
        bits, group, scale_bits = spec
        q = QuantSpec(bits, group, "search", scale_bits)
        sec = _best_seconds(lambda fn=fn, q=q: fn(x, q)) * per_m
        out.append((f"quantize, {label}", sec, sec / minmax))
    for bits in (2, 3, 4):
        spec = QuantSpec(bits, 128, "search", 6)
        q = quantize(x, spec)
        part = Part("task:t", bits, 128, codec=sizes.DEFAULT_CODEC)
        shape = tuple(x.shape)
        frame = stored_codes(part, shape, q)
        enc = _best_seconds(lambda q=q, part=part, s=shape: stored_codes(part, s, q)) * per_m
        zeros = q.zeros.numpy()

        def decode(frame=frame, bits=bits, zeros=zeros, shape=shape) -> None:
            codes = entropy.decode(frame, bits, x.numel())
            entropy.center(codes, zeros, shape, 128, bits, undo=True)

        dec = _best_seconds(decode) * per_m
        out.append((f"zstd encode, {bits}-bit codes", enc, enc / minmax))
        out.append((f"zstd decode, {bits}-bit codes", dec, dec / minmax))
    return out


def entropy_gain(x: torch.Tensor) -> list[tuple[int, float, float]]:
    """Code bits per weight after zstd, for min-max and searched ranges (G64, 6-bit scales)."""
    rows = []
    for bits in range(1, 9):
        coded = []
        for rng in ("minmax", "search"):
            spec = QuantSpec(bits, 64, rng, 6)
            q = quantize(x, spec)
            coded.append(8 * coded_bytes(q, spec, tuple(x.shape)) / x.numel())
        rows.append((bits, *coded))
    return rows


def plot(panels: list[tuple[str, dict]], path: Path) -> None:
    """One log-scale R-D panel per (title, curves), with the bound and the target."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), sharey=True)
    axes = np.atleast_1d(axes)
    r = np.linspace(1.0, 6.0, 50)
    for ax, (title, curves) in zip(axes, panels, strict=True):
        for label, points in curves.items():
            pts = sorted(points)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        pts = sorted(curves.get(BUDGET_CURVE, []))
        if pts:
            ax.plot(
                [p[2] for p in pts],
                [p[3] for p in pts],
                "k-.",
                marker="x",
                label="all together, quantized tensors only (payload R)",
            )
        ax.plot(r, 2.0**-r, "k--", label="Gaussian bound 2^-R")
        ax.plot(r, TARGET * 2.0**-r, "k:", label="target 1.5 x 2^-R")
        ax.set_yscale("log")
        ax.set_xlim(0.9, 6.0)
        errors = [p[1] for points in curves.values() for p in points]
        ax.set_ylim(min([0.01, *errors]) / 1.5, 3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("effective bits per weight R (whole archive, every byte)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("rel-L2 error of task vectors")
    axes[-1].legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def rd_table(curves: dict, title: str) -> list[str]:
    lines = [
        title,
        "",
        "| scheme | R (bpw) | rel-L2 | rel-L2 / 2^-R | payload R | payload rel-L2 "
        "| payload rel-L2 / 2^-R |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, points in curves.items():
        for bpw, err, r_q, err_q in sorted(points):
            lines.append(
                f"| {label} | {bpw:.3f} | {err:.4f} | {err * 2**bpw:.2f} | {r_q:.3f} | "
                f"{err_q:.4f} | {err_q * 2**r_q:.2f} |"
            )
    return lines


def target_table(curves: dict, infeasible: dict) -> list[str]:
    """The issue's target, rel-L2 <= 1.5 x 2^-R, checked for `--budget R` at every R."""
    lines = [
        "| --budget R | R written | rel-L2 | 1.5 x 2^-R | met (whole archive) "
        "| payload R | payload rel-L2 | 1.5 x 2^-(payload R) | met (payload) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # rd_curves records one point per feasible budget, in BUDGETS order
    feasible = [b for b in BUDGETS if f"{BUDGET_CURVE} @ {b}" not in infeasible]
    by_budget = dict(zip(feasible, curves.get(BUDGET_CURVE, []), strict=True))
    for budget in BUDGETS:
        if budget not in by_budget:
            why = infeasible[f"{BUDGET_CURVE} @ {budget}"]
            lines.append(f"| {budget} | infeasible: {why} | | | no | | | | |")
            continue
        bpw, err, r_q, err_q = by_budget[budget]
        bound, bound_q = TARGET * 2**-bpw, TARGET * 2**-r_q
        written = f"{bpw:.3f}" + (
            " (saturated: 8 bits wherever it helps)" if bpw < budget - 0.05 else ""
        )
        lines.append(
            f"| {budget} | {written} | {err:.4f} | {bound:.4f} | {_yes(err <= bound)} | "
            f"{r_q:.3f} | {err_q:.4f} | {bound_q:.4f} | {_yes(err_q <= bound_q)} |"
        )
    return lines


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(zoo, synthetic, sweep, times, gains) -> str:
    zoo_curves, zoo_infeasible, zoo_overhead = zoo
    syn_curves, syn_infeasible, _ = synthetic
    lines = rd_table(
        zoo_curves, "### R-D curve: example zoo (real task vectors, 8 tasks x 109,184 weights)"
    )
    lines += ["", zoo_overhead, "", "#### Target check on the zoo: `--budget R`, all steps on", ""]
    lines += target_table(zoo_curves, zoo_infeasible)
    lines += [""]
    lines += rd_table(
        syn_curves, "### R-D curve: synthetic heavy-tailed task vectors (3 tasks x 1.05 M weights)"
    )
    lines += ["", "#### Target check on synthetic data: `--budget R`, all steps on", ""]
    lines += target_table(syn_curves, syn_infeasible)
    lines += [
        "",
        "### Group size and scale precision (synthetic; range search; one 256x512 tensor)",
        "",
        "| bits | group | scale bits | rel-L2 | R raw | err x 2^R raw | R zstd | err x 2^R zstd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bits, group, sb, err, r_raw, r_z in sweep:
        lines.append(
            f"| {bits} | {group} | {sb or 'fp32'} | {err:.4f} | {r_raw:.3f} | "
            f"{err * 2**r_raw:.2f} | {r_z:.3f} | {err * 2**r_z:.2f} |"
        )
    lines += [
        "",
        "### Entropy stage: code bits per weight after zstd (synthetic; G64, 6-bit scales)",
        "",
        "| bits | min-max ranges | searched ranges |",
        "|---|---|---|",
    ]
    lines += [f"| {b} | {a:.3f} | {s:.3f} |" for b, a, s in gains]
    lines += [
        "",
        "### Cost (seconds per million weights, one thread, best of 3, one run; G128, 3 bits)",
        "",
        "| step | s / M weights | x min-max |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {sec:.4f} | {ratio:.1f} |" for label, sec, ratio in times]
    return "\n".join(lines)


def overhead_line(pre: Path, fts: list[Path], work: Path) -> str:
    """Where the zoo's bytes go at the default settings, 2 bits."""
    out = work / "o.tvq"
    pack(pre, fts, out, PackOptions(bits=2), overwrite=True)
    report = inspect_archive(out)
    b, n = report["bytes"], report["parameters"]["total"] * len(fts)
    parts = ", ".join(f"{k} {8 * b[k] / n:.3f}" for k in ("codes", "scales", "exact", "header"))
    return (
        f"Where the bits go (defaults, 2 bits, bits per weight of the whole archive): {parts}. "
        "'payload' columns count only the quantized tensors' codes and scales per quantized "
        "weight, and their error (exact tensors have none)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="an example zoo folder (built if missing)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        zoo = build_zoo(args.zoo or work / "zoo", seed=0)
        zoo_fts = list(zoo.tasks.values())
        zoo_curves, zoo_bad = rd_curves(zoo.pretrained, zoo_fts, work)
        zoo_part = (zoo_curves, zoo_bad, overhead_line(zoo.pretrained, zoo_fts, work))
        syn_dir = work / "synthetic"
        syn_dir.mkdir()
        pre, fts = make_synthetic(syn_dir)
        syn_curves, syn_bad = rd_curves(pre, fts, work)
        x = load_file(str(fts[0]))["layer3.weight"] - load_file(str(pre))["layer3.weight"]
    sweep = group_sweep(x)
    big = x.repeat(8, 1)  # 1 M weights for timings
    table = render(zoo_part, (syn_curves, syn_bad, ""), sweep, timings(big), entropy_gain(x))
    plot(
        [
            ("example zoo (real task vectors, 8 x 109 k weights)", zoo_curves),
            ("synthetic heavy-tailed (3 x 1.05 M weights)", syn_curves),
        ],
        PNG,
    )
    write_section(DOC, "BENCHMARK", table)
    print(table)


if __name__ == "__main__":
    main()
