"""Does HDRQ's noise-sampled rounding help? Rounding rules for merges written onto an integer
grid, and post-merge quantization of full-precision merges, measured on the example zoo.

A. HDRQ's own setting: pairs of FQ archives (2, 3, 4 and 8 bits) averaged back onto the
   inputs' grid (`tvq merge fq.tvq --tasks a,b --method average --out x.tvq`); ambiguous values
   are exact .5 ties of the mean code. Scored on the pair's two tasks, averaged over 4 pairs.
B. All 8 tasks: the FQ average on the inputs' grid (T = 8: ties where the code sum is 4 mod
   8), and average and task arithmetic of TVQ archives written onto a min-max grid of the
   same width (`--bits B`; ambiguous: within `--tie-tolerance` 0.05 of a midpoint).
   Scored on all 8 tasks.
C. Post-merge quantization (E-PMQ's setting): task arithmetic and TIES of the exact (fp32)
   task vectors written dense and as compressed-tensors folders (`--quantize w8|w4`).

Rules: floor (HDRQ eq. 11 as printed), nearest, noise with the minimum-over-inputs selection
and nearest as candidate 0 (K = 1, 4, 16, 30), and three ablations: the earlier every-input
rule (K = 16), HDRQ's research code (first draw accepted, replaced only when every input's
cosine improves, nearest not a candidate; K = 30), and plain random tie-breaking (one draw, no
selection). Noise rules run with several seeds: cells give the mean and the spread (max - min)
over seeds. Each merge goes through `tvq_cli.merge.merge` (what `tvq merge` runs) and the
written archive or folder is read back and scored with `tvq_cli.zoo`.

D. With `--minilm DIR`: the same questions on real fine-tunes of all-MiniLM-L6-v2 (22.7 M
   parameters; the four sentence tasks of benchmarks/minilm_fidelity.py, whose checkpoints in
   DIR are reused or built): FQ 4-bit pairs on the inputs' grid, and post-merge quantization
   whose packed folders are loaded by transformers through compressed-tensors. Needs what
   minilm_fidelity.py needs, plus `pip install 'tvq-cli[deploy]'`.

Writes the sections between the HDRQ (and HDRQ-MINILM) markers of docs/results.md. About 10
minutes on a shared 2-core CPU for A-C (`--seeds 3 --pairs 2` for a quicker look), 15 more
for D.
Usage: PYTHONPATH=. python benchmarks/hdrq_rounding.py [--zoo DIR] [--seeds N] [--pairs N]
       [--minilm DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tvq_cli import PackOptions, open_archive, pack
from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.merge import MergeRequest, merge
from tvq_cli.merge.rounding import DEFAULT_ELSEWHERE, DEFAULT_ON_EXACT_TIES, Rounding
from tvq_cli.zoo import Zoo, build_zoo, evaluate, evaluate_state, mean_accuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results.md"
MARKER = "HDRQ"
MINILM_MARKER = "HDRQ-MINILM"
MINILM_PAIRS = [("domain", "kind"), ("returns", "long")]
MINILM_RULES = ("floor", "nearest", "noise K=16", "random ties")
RESOLUTION = 0.4  # points: about 20 test images of the zoo; smaller changes are chance
PAIRS = [("digit", "parity"), ("mod3", "div3"), ("prime", "loops"), ("mod4", "half")]


@dataclass(frozen=True)
class Rule:
    label: str
    mode: str
    samples: int = 0
    select: str = "min"
    keep_nearest: bool = True

    @property
    def random(self) -> bool:
        return self.samples > 0

    def rounding(self, seed: int) -> Rounding:
        return Rounding(self.mode, self.samples, seed=seed, select=self.select,
                        keep_nearest=self.keep_nearest)  # fmt: skip


RULES = [
    Rule("floor", "floor"),
    Rule("nearest", "nearest"),
    *(Rule(f"noise K={k}", "noise", k) for k in (1, 4, 16, 30)),
    Rule("every-input rule K=16", "noise", 16, "every"),
    Rule("HDRQ code K=30", "noise", 30, "every", False),
    Rule("random ties", "noise", 1, "min", False),
]


@dataclass
class Outcome:
    accuracy: float
    ambiguous: float  # share of quantized values
    changed: int  # tensors whose codes differ from nearest rounding
    tensors: int
    worst_cosine: float  # the smallest cosine over inputs, whole model


class Bench:
    def __init__(self, zoo: Zoo, work: Path, seeds: int):
        self.zoo, self.work, self.seeds = zoo, work, seeds
        self.pre_dir = zoo.pretrained.parent
        pre = Checkpoint(zoo.pretrained)
        self.pre = {n: pre.load(n) for n in pre.names}
        self.runs = 0

    def archive(self, label: str, **options) -> Path:
        out = self.work / f"{label}.tvq"
        if not out.exists():
            pack(self.pre_dir, list(self.zoo.tasks.values()), out, PackOptions(**options))
        return out

    def score_archive(self, path: Path, tasks: list[str]) -> float:
        archive = open_archive(path)
        task = archive.tasks[0]
        state = {}
        for name, tensor in self.pre.items():
            if tensor.is_floating_point():
                tau = archive.task_vector(task, name, tensor.to(torch.float32))
                state[name] = tensor.to(torch.float32) + tau
            else:
                state[name] = tensor
        return mean_accuracy(evaluate_state(state, self.zoo, tasks))

    def on_grid(self, archive: Path, tasks: list[str], method: str, rule: Rule, seed: int,
                bits: int | None = None) -> Outcome:  # fmt: skip
        out = self.work / "out.tvq"
        request = MergeRequest(
            [archive], self.pre_dir, out, method, tasks=tasks, bits=bits, force=True, threads=1
        )
        report = merge(request, rounding=rule.rounding(seed))
        self.runs += 1
        rounding = report["rounding"]
        return Outcome(
            self.score_archive(out, tasks),
            rounding["ambiguous"] / rounding["values"],
            rounding["tensors_changed"],
            rounding["tensors"],
            min(rounding["overall"]["cosine_chosen"]),
        )

    def dense(self, archive: Path, tasks: list[str], method: str, **extra) -> float:
        out = self.work / ("dense" if extra.get("quantize") else "dense.safetensors")
        request = MergeRequest([archive], self.pre_dir, out, method, tasks=tasks, force=True,
                               threads=1, **extra)  # fmt: skip
        merge(request)
        self.runs += 1
        return mean_accuracy(evaluate(out, self.zoo, tasks))

    def rule_cells(self, runs) -> dict[str, list[Outcome]]:
        """Every rule's outcomes (one per seed, or one for deterministic rules); `runs(rule,
        seed)` returns the outcome of one merge set."""
        cells = {}
        for rule in RULES:
            seeds = range(self.seeds) if rule.random else range(1)
            cells[rule.label] = [runs(rule, seed) for seed in seeds]
            log(f"    {rule.label}: {fmt_acc(cells[rule.label])}")
        return cells


def merged_outcome(outcomes: list[Outcome]) -> Outcome:
    """The mean of several merges' outcomes (the pairs of one seed)."""
    n = len(outcomes)
    return Outcome(
        sum(o.accuracy for o in outcomes) / n,
        sum(o.ambiguous for o in outcomes) / n,
        sum(o.changed for o in outcomes),
        sum(o.tensors for o in outcomes),
        sum(o.worst_cosine for o in outcomes) / n,
    )


def fmt_acc(outcomes: list[Outcome]) -> str:
    return _spread([o.accuracy for o in outcomes])


def verdict(deltas: list[float]) -> tuple[str, str]:
    """Whether a change against nearest rounding is one ("helps", "hurts", "no effect"), and
    the cell that shows it."""
    mean = statistics.fmean(deltas)
    spread = f" ({min(deltas):+.2f}..{max(deltas):+.2f})" if len(deltas) > 1 else ""
    if abs(mean) > RESOLUTION and min(deltas) * max(deltas) > 0:
        word = "helps" if mean > 0 else "hurts"
    else:
        word = "no effect"
    return word, f"{mean:+.2f}{spread} {word}"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the sections ------------------------------------------------------------------------------


def section_a(bench: Bench, pairs: list[tuple[str, str]]) -> list[tuple[str, float, dict]]:
    rows = []
    for bits in (2, 3, 4, 8):
        archive = bench.archive(f"fq{bits}", scheme="fq", bits=bits)
        log(f"A: FQ {bits}-bit pairs")
        full = statistics.fmean(bench.dense(archive, list(p), "average") for p in pairs)

        def runs(rule: Rule, seed: int, archive=archive) -> Outcome:
            return merged_outcome(
                [bench.on_grid(archive, list(p), "average", rule, seed) for p in pairs]
            )

        rows.append((f"FQ {bits}-bit pairs, average", full, bench.rule_cells(runs)))
    return rows


def section_b(bench: Bench) -> list[tuple[str, float, dict]]:
    rows, tasks = [], bench.zoo.task_names
    for bits in (2, 3, 4):
        settings = [
            (f"FQ {bits}-bit, average of 8 (inputs' grid)", f"fq{bits}", "fq", "average", None),
            (f"TVQ {bits}-bit, average of 8 (min-max grid)", f"tvq{bits}", "tvq", "average", bits),
            (f"TVQ {bits}-bit, task arithmetic (min-max grid)", f"tvq{bits}", "tvq",
             "task_arithmetic", bits),
        ]  # fmt: skip
        for label, name, scheme, method, grid_bits in settings:
            archive = bench.archive(name, scheme=scheme, bits=bits)
            log(f"B: {label}")
            full = bench.dense(archive, tasks, method)

            def runs(rule, seed, archive=archive, method=method, grid_bits=grid_bits):
                return bench.on_grid(archive, tasks, method, rule, seed, grid_bits)

            rows.append((label, full, bench.rule_cells(runs)))
    return rows


PMQ = [
    ("dense fp32", {}),
    ("w8 (per channel)", {"quantize": "w8"}),
    ("w4 g128", {"quantize": "w4"}),
    ("w4 g32", {"quantize": "w4", "group_size": 32}),
    ("w4 g32 asymmetric", {"quantize": "w4", "group_size": 32, "symmetric": False}),
    ("w4 g32 floor", {"quantize": "w4", "group_size": 32, "rounding": "floor"}),
    ("w4 g128 floor", {"quantize": "w4", "rounding": "floor"}),
]


def section_c(bench: Bench) -> dict[str, list[float]]:
    archive = bench.archive("fp32", scheme="tvq", keep=("*",))
    cells = {}
    for method in ("task_arithmetic", "ties"):
        log(f"C: {method}")
        cells[method] = [bench.dense(archive, bench.zoo.task_names, method, **o) for _, o in PMQ]
    return cells


# --- the document ------------------------------------------------------------------------------


def render(rows: list, pmq: dict, seeds: int, pairs: int, minutes: float) -> str:
    labels = [r.label for r in RULES]
    head = "| setting | float merge | ambiguous | " + " | ".join(labels) + " |"
    lines = [
        "## 5. Rounding a merge onto a grid (HDRQ 4.3), and post-merge quantization",
        "",
        f"Generated by `PYTHONPATH=. python benchmarks/hdrq_rounding.py` ({minutes:.0f} minutes "
        f"on a shared 2-core CPU): {seeds} seeds per noise rule, {pairs} task pairs in A.",
        "",
        "Mean accuracy (%) of the merged model written onto the grid; noise rules give the mean "
        "± half the range over seeds. *float merge* is the same merge before it is put on the "
        "grid (what `--out model.safetensors` gives); *ambiguous* is the share of quantized "
        "values that noise may move.",
        "",
        head,
        "|" + "---|" * (len(labels) + 3),
    ]
    for label, full, cells in rows:
        amb = cells["nearest"][0].ambiguous
        accs = " | ".join(fmt_acc(cells[k]) for k in labels)
        lines.append(f"| {label} | {full:.2f} | {amb:.1%} | {accs} |")
    lines += [
        "",
        "Tensors whose codes differ from nearest rounding (summed over the runs of a seed, mean "
        "over seeds) and the worst input's cosine `cos(candidate - x_t, merge - x_t)` over the "
        "whole model (the score noise rounding maximizes):",
        "",
        "| setting | tensors | changed: noise K=16 | K=30 | every-input K=16 | HDRQ code K=30 "
        "| worst cosine: floor | nearest | noise K=30 | HDRQ code K=30 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, _, cells in rows:

        def changed(key, cells=cells):
            return statistics.fmean(o.changed for o in cells[key])

        def cosine(key, cells=cells):
            return statistics.fmean(o.worst_cosine for o in cells[key])

        lines.append(
            f"| {label} | {cells['nearest'][0].tensors} | {changed('noise K=16'):.1f} | "
            f"{changed('noise K=30'):.1f} | {changed('every-input rule K=16'):.1f} | "
            f"{changed('HDRQ code K=30'):.1f} | {cosine('floor'):.5f} | {cosine('nearest'):.5f} "
            f"| {cosine('noise K=30'):.5f} | {cosine('HDRQ code K=30'):.5f} |"
        )
    compared = ("noise K=16", "random ties", "floor")
    lines += [
        "",
        "Against nearest rounding, in points (mean, and the range over seeds): *helps* or "
        f"*hurts* when the mean moves by more than {RESOLUTION} and every seed moves the same "
        "way, otherwise *no effect*:",
        "",
        "| setting | " + " | ".join(f"{c} - nearest" for c in compared) + " |",
        "|---|" + "---|" * len(compared),
    ]
    calls: dict[str, list[str]] = {"helps": [], "hurts": [], "no effect": []}
    for label, _, cells in rows:
        near = cells["nearest"][0].accuracy
        verdicts = [verdict([o.accuracy - near for o in cells[c]]) for c in compared]
        lines.append(f"| {label} | " + " | ".join(cell for _, cell in verdicts) + " |")
        calls[verdicts[0][0]].append(label)
    lines += [
        "",
        f"In short, noise rounding (K = 16) against nearest rounding: helps in "
        f"{len(calls['helps'])} of {len(rows)} settings ({'; '.join(calls['helps']) or 'none'}), "
        f"hurts in {len(calls['hurts'])} ({'; '.join(calls['hurts']) or 'none'}), and does "
        f"nothing measurable in the other {len(calls['no effect'])}. Defaults chosen from "
        f"this (`tvq_cli/merge/rounding.py`): `{DEFAULT_ON_EXACT_TIES}` where ties are exact "
        f"(an FQ average on the inputs' grid), `{DEFAULT_ELSEWHERE}` elsewhere, where noise "
        "wrote the same codes as nearest; why, in [merge.md](merge.md).",
    ]
    lines += [
        "",
        "Post-merge quantization (C): mean accuracy over the 8 tasks of the full-precision "
        "merge of the exact task vectors, written dense and as compressed-tensors folders "
        "(`tvq merge fp32.tvq ... --quantize w8|w4`, nearest rounding unless the column says "
        "floor; read back with `tvq zoo eval`, which dequantizes as transformers does):",
        "",
        "| method | " + " | ".join(label for label, _ in PMQ) + " |",
        "|---|" + "---|" * len(PMQ),
    ]
    for method, accs in pmq.items():
        lines.append(f"| {method} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")
    return "\n".join(lines)


def section_minilm(folder: Path, work: Path, seeds: int) -> str:
    """D: FQ 4-bit pairs and post-merge quantization on MiniLM fine-tunes."""
    import minilm_fidelity as ml

    start = time.perf_counter()
    pre, folders, setup = ml.build(folder)
    fts = [folders[t] for t in ml.TASKS]

    def score(model: Path, tasks) -> float:
        return statistics.fmean(ml.scores(model, setup, tasks).values())

    def merged(archives, method: str, tasks, rounding: Rounding | None = None, **extra) -> Path:
        out = work / ("m.tvq" if rounding else "m")
        request = MergeRequest(archives, pre, out, method, tasks=tasks, force=True, **extra)
        merge(request, rounding=rounding)
        return out

    fq4 = work / "minilm-fq4.tvq"
    pack(pre, fts, fq4, PackOptions(scheme="fq", bits=4))
    rules = {r.label: r for r in RULES}
    rows = [("float merge", [statistics.fmean(
        score(merged([fq4], "average", list(p)), p) for p in MINILM_PAIRS)])]  # fmt: skip
    for label in MINILM_RULES:
        rule, accs = rules[label], []
        for seed in range(seeds if rules[label].random else 1):
            pair_accs = []
            for pair in MINILM_PAIRS:
                grid = merged([fq4], "average", list(pair), rule.rounding(seed))
                pair_accs.append(score(merged([grid], "average", None), pair))
            accs.append(statistics.fmean(pair_accs))
        rows.append((label, accs))
        log(f"D: FQ 4-bit pairs, {label}: {accs}")
    exact = work / "minilm-fp32.tvq"
    pack(pre, fts, exact, PackOptions(scheme="tvq", keep=("*",)))
    pmq = {}
    for method in ("task_arithmetic", "ties"):
        pmq[method] = [score(merged([exact], method, None, **o), ml.TASKS) for _, o in PMQ[:3]]
        log(f"D: {method}: {pmq[method]}")
    minutes = (time.perf_counter() - start) / 60
    lines = [
        "### The same on MiniLM fine-tunes",
        "",
        f"Generated by `PYTHONPATH=. python benchmarks/hdrq_rounding.py --minilm DIR` "
        f"({minutes:.0f} minutes): all-MiniLM-L6-v2 fine-tuned on the four sentence tasks of "
        "[fidelity.md](fidelity.md) (domain, kind, returns, long), scored through the frozen "
        f"probe heads. FQ 4-bit pairs ({', '.join('+'.join(p) for p in MINILM_PAIRS)}) averaged "
        f"on the inputs' grid; noise rules over {seeds} seeds (mean ± half the range):",
        "",
        "| " + " | ".join(label for label, _ in rows) + " |",
        "|" + "---|" * len(rows),
        "| " + " | ".join(_spread(accs) for _, accs in rows) + " |",
        "",
        "Post-merge quantization of the exact task vectors (mean over the 4 tasks; packed "
        "folders loaded with `transformers.AutoModel.from_pretrained`, which decompresses them "
        "through compressed-tensors):",
        "",
        "| method | " + " | ".join(label for label, _ in PMQ[:3]) + " |",
        "|---|" + "---|" * 3,
        *(f"| {m} | " + " | ".join(f"{a:.2f}" for a in accs) + " |" for m, accs in pmq.items()),
    ]
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=None, help="zoo folder (built if missing)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=len(PAIRS))
    parser.add_argument("--minilm", type=Path, default=None, help="MiniLM fine-tunes folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.minilm is not None:
            body = section_minilm(args.minilm, work, args.seeds)
            write_section(DOC, MINILM_MARKER, body)
            print(body)
            return
        zoo = build_zoo(args.zoo or work / "zoo", seed=0)
        bench = Bench(zoo, work, args.seeds)
        rows = section_a(bench, PAIRS[: args.pairs]) + section_b(bench)
        pmq = section_c(bench)
    minutes = (time.perf_counter() - start) / 60
    body = render(rows, pmq, args.seeds, args.pairs, minutes)
    write_section(DOC, MARKER, body)
    print(body)
    log(f"{bench.runs} merges in {minutes:.1f} minutes; wrote the {MARKER} section of {DOC}")


if __name__ == "__main__":
    main()
