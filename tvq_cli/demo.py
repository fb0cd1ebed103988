"""`tvq demo`: what the tool does, end to end on the example zoo, in under a minute.

Every step is a real `tvq` command: the demo prints it as a user would type it (paths as
given, relative to the current folder), then runs it in-process. It builds (or reuses) the zoo,
packs it four ways (every tensor exact as the fp32 reference, TVQ 4-bit and 2-bit, RTVQ B3O2),
shows the inspect summary, merges each archive with task arithmetic and TIES, scores the merges, and
ends with one table: what each scheme costs in bits and what it costs in accuracy.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import TvqError
from .report import inspect_archive
from .report.render import human_bytes

DEFAULT_DIR = Path("tvq-demo")
METHODS = ("task_arithmetic", "ties")
SCHEMES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("fp32 (exact)", "fp32.tvq", ("--keep", "*")),
    ("TVQ 4-bit", "tvq4.tvq", ()),
    ("TVQ 2-bit", "tvq2.tvq", ("--bits", "2")),
    ("RTVQ B3O2", "rtvq.tvq", ("--scheme", "rtvq")),
)
"""(label, archive file, extra `tvq pack` flags); the first row is the fp32 reference."""
TABLE_HEADER = ("scheme", "bits/weight", "archive", "TA acc", "TIES acc", "Δ TA", "Δ TIES")

Run = Callable[[list[str]], int]
Echo = Callable[[str], None]


@dataclass
class DemoRow:
    """One scheme's line of the closing table (accuracies in percent, mean over tasks)."""

    scheme: str
    bits_per_weight: float
    size_bytes: int
    accuracy: dict[str, float]


class Steps:
    """Prints each command, then runs it; stops the demo at the first failing step."""

    def __init__(self, run: Run, echo: Echo):
        self.run, self.echo = run, echo

    def __call__(self, *args: object, capture: bool = False) -> str:
        argv = [str(a) for a in args]
        self.echo(f"\n$ tvq {shlex.join(argv)}")
        out = io.StringIO()
        with contextlib.redirect_stdout(out) if capture else contextlib.nullcontext():
            code = self.run(argv)
        if code != 0:
            raise TvqError(f"demo stopped: 'tvq {argv[0]}' failed (exit {code})")
        return out.getvalue()


def run_demo(root: Path, run: Run, echo: Echo = print) -> list[DemoRow]:
    """Run the demo in `root` (zoo, archives and merges go there); returns the table rows."""
    from .zoo import TASKS  # torch: imported when the demo runs, not with `tvq --help`

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise TvqError(f"{root}: exists and is not a folder")
    (root / "merged").mkdir(parents=True, exist_ok=True)
    step = Steps(run, echo)
    zoo = root / "zoo"
    pre = zoo / "pretrained"
    step("zoo", "build", zoo)
    rows = []
    for label, name, flags in SCHEMES:
        archive = root / name
        step("pack", "--pretrained", pre, *(zoo / t for t in TASKS), "--out", archive,
             *flags, "--force", "--quiet")  # fmt: skip
        if name == "tvq4.tvq":
            step("inspect", archive)
        accuracy = {}
        for method in METHODS:
            merged = root / "merged" / f"{archive.stem}-{method}.safetensors"
            step("merge", archive, "--pretrained", pre, "--method", method, "--out", merged,
                 "--force", "--quiet")  # fmt: skip
            report = json.loads(step("zoo", "eval", merged, "--zoo", zoo, "--json", capture=True))
            accuracy[method] = report["mean"]
            per_task = ", ".join(f"{t} {a:.1f}" for t, a in report["accuracy"].items())
            echo(f"mean accuracy {report['mean']:.2f} % ({per_task})")
        storage = inspect_archive(archive)
        rows.append(DemoRow(label, storage["bits_per_weight"], storage["bytes"]["total"], accuracy))
    echo("\n" + format_table(rows))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """A Markdown table; deltas are against the first row (the fp32 reference)."""
    ref = rows[0].accuracy
    lines = [_line(TABLE_HEADER), _line(["---"] * len(TABLE_HEADER))]
    for row in rows:
        acc = [row.accuracy[m] for m in METHODS]
        delta = [row.accuracy[m] - ref[m] for m in METHODS]
        lines.append(
            _line(
                [
                    row.scheme,
                    f"{row.bits_per_weight:.2f}",
                    human_bytes(row.size_bytes),
                    *(f"{a:.2f}" for a in acc),
                    *(f"{d:+.2f}" for d in delta),
                ]
            )
        )
    return "\n".join(lines)


def _line(cells: list[str] | tuple[str, ...]) -> str:
    return "| " + " | ".join(cells) + " |"
