"""Rate-distortion of tvq's quantizers: error vs effective bits per weight, every byte counted.

Writes the tables into docs/fidelity.md (between the BENCHMARK markers) and the plot into
docs/rd_curve.png. Data: synthetic heavy-tailed task vectors (3 tasks, 8 tensors of 256x512,
per-row scales spread over two decades, Gaussian-scale-mixture deltas), so that it runs in a
couple of minutes on a laptop CPU. Usage: PYTHONPATH=. python benchmarks/rate_distortion.py
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tvq_cli import PackOptions, inspect_archive, pack  # noqa: E402
from tvq_cli.quant import entropy  # noqa: E402
from tvq_cli.quant.quantizer import QuantSpec, dequantize, quantize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "fidelity.md"
PNG = ROOT / "docs" / "rd_curve.png"
PAPER = dict(group_size=0, range="minmax", scale_bits=0, codec="raw")


def make_zoo(root: Path, tasks: int = 3, tensors: int = 8) -> tuple[Path, list[Path]]:
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


def measure(pre: Path, fts: list[Path], out: Path, options: PackOptions) -> tuple[float, float]:
    """(effective bits per weight of the written archive, rel-L2 of all task vectors)."""
    pack(pre, fts, out, options, overwrite=True)
    report = inspect_archive(out, against=(pre, fts))
    return report["bits_per_weight"], report["error"]["rel_l2"]


def rd_curves(pre: Path, fts: list[Path], work: Path) -> dict[str, list[tuple[float, float]]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    out = work / "a.tvq"

    def run(label: str, **kw) -> None:
        curves.setdefault(label, []).append(measure(pre, fts, out, PackOptions(**kw)))

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
    for budget in (2.0, 2.5, 3.0, 3.5, 4.0, 4.5):
        run("+ budget allocation only", budget=budget, **PAPER)
        run("all together: --budget R", budget=budget)
    return curves


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
                coded = 8 * len(entropy.encode(q.codes.numpy(), bits))
                rows.append(
                    (bits, group, scale_bits, err, (n * bits + meta) / n, (coded + meta) / n)
                )
    return rows


def timings(x: torch.Tensor) -> list[tuple[str, float]]:
    """Seconds per million weights: min-max vs range search vs compact scales; zstd decode."""
    per_m = 1e6 / x.numel()
    out = []
    for label, spec in (
        ("min-max, fp32 scales", QuantSpec(3, 64)),
        ("range search, fp32 scales", QuantSpec(3, 64, "search")),
        ("range search + 6-bit scales", QuantSpec(3, 64, "search", 6)),
    ):
        start = time.perf_counter()
        quantize(x, spec)
        out.append((f"quantize, {label}", (time.perf_counter() - start) * per_m))
    for bits in (2, 3, 4):
        codes = quantize(x, QuantSpec(bits, 64, "search", 6)).codes.numpy()
        start = time.perf_counter()
        frame = entropy.encode(codes, bits)
        enc = time.perf_counter() - start
        start = time.perf_counter()
        entropy.decode(frame, bits, codes.size)
        dec = time.perf_counter() - start
        out.append((f"zstd encode, {bits}-bit codes", enc * per_m))
        out.append((f"zstd decode, {bits}-bit codes", dec * per_m))
    return out


def entropy_gain(x: torch.Tensor) -> list[tuple[int, float, float]]:
    """Code bits per weight after zstd, for min-max and searched ranges (G64, 6-bit scales)."""
    rows = []
    for bits in range(1, 9):
        coded = []
        for rng in ("minmax", "search"):
            q = quantize(x, QuantSpec(bits, 64, rng, 6))
            coded.append(8 * len(entropy.encode(q.codes.numpy(), bits)) / x.numel())
        rows.append((bits, *coded))
    return rows


def plot(curves: dict[str, list[tuple[float, float]]]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    r = np.linspace(1.5, 5.5, 50)
    ax.plot(r, 2.0**-r, "k--", label="Gaussian bound 2^-R")
    ax.plot(r, 1.5 * 2.0**-r, "k:", label="target 1.5 x 2^-R")
    ax.set_yscale("log")
    ax.set_xlim(1.5, 5.8)
    ax.set_ylim(0.01, 3)
    ax.set_xlabel("effective bits per weight R (whole archive)")
    ax.set_ylabel("rel-L2 error of task vectors")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(PNG, dpi=120)


def render(curves, sweep, times, gains) -> str:
    lines = [
        "### R-D curve (synthetic heavy-tailed task vectors, 3 tasks x 1.05 M weights)",
        "",
        "| scheme | R (bpw) | rel-L2 | rel-L2 / 2^-R |",
        "|---|---|---|---|",
    ]
    for label, points in curves.items():
        for bpw, err in sorted(points):
            lines.append(f"| {label} | {bpw:.3f} | {err:.4f} | {err * 2**bpw:.2f} |")
    lines += [
        "",
        "### Group size and scale precision (range search; one 256x512 tensor)",
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
        "### Entropy stage: code bits per weight after zstd (G64, 6-bit scales)",
        "",
        "| bits | min-max ranges | searched ranges |",
        "|---|---|---|",
    ]
    lines += [f"| {b} | {a:.3f} | {s:.3f} |" for b, a, s in gains]
    lines += [
        "",
        "### Cost (seconds per million weights, one thread, one run)",
        "",
        "| step | s / M weights |",
        "|---|---|",
    ]
    lines += [f"| {label} | {sec:.4f} |" for label, sec in times]
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pre, fts = make_zoo(work)
        curves = rd_curves(pre, fts, work)
        from safetensors.torch import load_file

        x = load_file(str(fts[0]))["layer3.weight"] - load_file(str(pre))["layer3.weight"]
    sweep = group_sweep(x)
    big = x.repeat(8, 1)  # 1 M weights for timings
    table = render(curves, sweep, timings(big), entropy_gain(x))
    plot(curves)
    text = DOC.read_text() if DOC.exists() else "<!-- BENCHMARK -->\n<!-- /BENCHMARK -->\n"
    text = re.sub(
        r"<!-- BENCHMARK -->.*<!-- /BENCHMARK -->",
        lambda _: f"<!-- BENCHMARK -->\n{table}\n<!-- /BENCHMARK -->",
        text,
        flags=re.S,
    )
    DOC.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
