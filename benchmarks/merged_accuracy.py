"""Merged accuracy at equal storage on the example zoo: the paper's quantizers vs tvq's best.

For each storage scheme the zoo's 8 fine-tunes are packed, the task vectors are read back
(`Archive.task_vector`) and merged with `tvq_cli.merge`'s methods (task arithmetic, TIES, EMR;
their defaults, as `tvq merge` uses them), and every merged model is scored with
`tvq_cli.zoo.evaluate_state` (EMR builds one model per task: task t is scored on its own
model). tvq's schemes get a `--budget` equal to the paper archive's bits per weight, so they
are never larger. Writes a table between the MERGED markers of docs/fidelity.md.
Usage: PYTHONPATH=. python benchmarks/merged_accuracy.py [--zoo DIR]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from doc_sections import zoo_benchmark  # benchmarks/ is the script's folder
from paper_settings import PAPER

from tvq_cli import PackOptions, inspect_archive, open_archive, pack
from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.merge.base import MergeContext
from tvq_cli.merge.methods import method_class
from tvq_cli.zoo import Zoo, evaluate_state, mean_accuracy

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "fidelity.md"
METHODS = ("task_arithmetic", "ties", "emr")

TaskVectors = Callable[[str, torch.Tensor], torch.Tensor]  # (tensor name, pre) -> [T, ...]


def merged_accuracy(zoo: Zoo, taus_of: TaskVectors, method: str) -> float:
    """Mean per-task accuracy (percent) of `method`'s merge of the given task vectors."""
    pre = Checkpoint(zoo.pretrained)
    names = [n for n, s in pre.specs.items() if s.is_float]
    tasks = zoo.task_names
    cls = method_class(method)
    targets = list(range(len(tasks))) if cls.per_task else []
    ctx = MergeContext(tasks, torch.ones(len(tasks)), names, seed=0, targets=targets)
    merger = cls({}, ctx)
    base = {n: pre.load_float(n) for n in names}
    for index in range(merger.stat_passes):
        for name in names:
            merger.observe(index, name, taus_of(name, base[name]))
        merger.end_pass(index)
    if not cls.per_task:
        state = {n: base[n] + merger.merge(n, taus_of(n, base[n])) for n in names}
        return mean_accuracy(evaluate_state(state, zoo))
    deltas = {n: merger.merge(n, taus_of(n, base[n])) for n in names}
    scores = {}
    for t, task in enumerate(tasks):
        state = {n: base[n] + deltas[n][t] for n in names}
        scores.update(evaluate_state(state, zoo, [task]))
    return mean_accuracy(scores)


def fp32_vectors(zoo: Zoo) -> TaskVectors:
    fts = [Checkpoint(p) for p in zoo.tasks.values()]
    return lambda name, pre: torch.stack([ft.load_float(name) - pre for ft in fts])


def archive_vectors(path: Path) -> TaskVectors:
    archive = open_archive(path)
    return lambda name, pre: torch.stack([archive.task_vector(t, name, pre) for t in archive.tasks])


def row(zoo: Zoo, label: str, taus_of: TaskVectors, sizes: tuple[float, float], err: float):
    """(label, (R whole archive, R of the quantized payload), rel-L2, accuracy per method)."""
    accs = [merged_accuracy(zoo, taus_of, m) for m in METHODS]
    print(label, sizes, err, accs, flush=True)
    return label, sizes, err, accs


def packed_row(zoo: Zoo, work: Path, label: str, options: PackOptions) -> tuple:
    out = work / "a.tvq"
    fts = list(zoo.tasks.values())
    pack(zoo.pretrained, fts, out, options, overwrite=True)
    report = inspect_archive(out, against=(zoo.pretrained, fts))
    b = report["bytes"]
    payload = 8 * (b["codes"] + b["scales"]) / (report["parameters"]["quantized"] * len(fts))
    sizes = (report["bits_per_weight"], payload)
    return row(zoo, label, archive_vectors(out), sizes, report["error"]["rel_l2"])


def measure(zoo: Zoo, work: Path) -> list[tuple]:
    rows = [row(zoo, "FP32 (no quantization)", fp32_vectors(zoo), (32.0, 32.0), 0.0)]
    paper = {
        "paper TVQ 2-bit": PackOptions(bits=2, **PAPER),
        "paper RTVQ B3O2": PackOptions(scheme="rtvq", base_bits=3, offset_bits=2, **PAPER),
    }
    for label, options in paper.items():
        rows.append(packed_row(zoo, work, label, options))
        # never larger: the budget is the paper archive's bits per weight, floored
        budget = int(rows[-1][1][0] * 1000) / 1000
        rows.append(packed_row(zoo, work, f"tvq --budget {budget}", PackOptions(budget=budget)))
        rows.append(
            packed_row(
                zoo,
                work,
                f"tvq --scheme rtvq --budget {budget}",
                PackOptions(scheme="rtvq", budget=budget),
            )
        )
    for scheme, budget in (("tvq", 2.4), ("rtvq", 2.5), ("tvq", 3.8)):
        label = f"tvq --scheme {scheme} --budget {budget}" if scheme != "tvq" else ""
        label = label or f"tvq --budget {budget}"
        rows.append(packed_row(zoo, work, label, PackOptions(scheme=scheme, budget=budget)))
    return rows


def render(rows: list[tuple]) -> str:
    fp32 = rows[0][3]
    lines = [
        "### Merged accuracy at equal storage (example zoo, 8 tasks; mean test accuracy, %)",
        "",
        "| storage | R (bpw) | payload R | rel-L2 | task arithmetic | TIES | EMR (per task) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, (bpw, payload), err, accs in rows:
        cells = " | ".join(
            f"{a:.2f}" if label.startswith("FP32") else f"{a:.2f} ({a - f:+.2f})"
            for a, f in zip(accs, fp32, strict=True)
        )
        r = "32 | 32" if label.startswith("FP32") else f"{bpw:.3f} | {payload:.3f}"
        lines.append(f"| {label} | {r} | {err:.4f} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    zoo_benchmark(__doc__, lambda zoo, work: render(measure(zoo, work)), DOC, "MERGED")
