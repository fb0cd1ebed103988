"""Start-up time of the header-only commands: `tvq --version`, `--help`, a command's `--help`,
and `tvq inspect` without `--against` (one file and sharded, table and `--json`).

Usage (from the repository root):

    PYTHONPATH=$PWD python benchmarks/bench_startup.py [--runs 5] [--before DIR] [--write]

Each command runs `--runs` times as its own process (`python -m tvq_cli ...`, as the `tvq`
script does), and the table gives the median wall time and the median CPU time (user + system,
of the child): on a shared machine the CPU time moves less than the wall time. `python -c pass`
is the interpreter's own floor, and `import torch` what every command paid before torch was
imported lazily. `--before DIR` also runs the commands from another checkout of tvq (e.g.
`git archive <commit> | tar -x -C DIR`; the native kernels are not needed), run for run
interleaved with this one so that both meet the same load. `--write` puts the table in
docs/performance.md.

Input: an archive of 3 tasks of a 24-layer model (8 tensors a layer, 195 tensors: the header
of an LLM's archive) with small random weights, packed once as one file and once sharded.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from doc_sections import write_section
from safetensors.torch import save_file

import tvq_cli

ROOT = Path(__file__).resolve().parent.parent
LAYER = ("q", "k", "v", "o", "up", "down", "norm1", "norm2")


def make_archives(work: Path) -> tuple[Path, Path]:
    """One archive file and one sharded archive of the same 3 tasks."""
    gen = torch.Generator().manual_seed(0)
    pre = {"embed.weight": torch.randn(256, 64, generator=gen)}
    for layer in range(24):
        for name in LAYER:
            shape = (64,) if name.startswith("norm") else (64, 64)
            pre[f"layers.{layer}.{name}.weight"] = torch.randn(*shape, generator=gen)
    save_file(pre, work / "pre.safetensors")
    tasks = []
    for task in range(3):
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in pre.items()}
        tasks.append(work / f"task{task}.safetensors")
        save_file(ft, tasks[-1])
    single, sharded = work / "tasks.tvq", work / "sharded"
    tvq_cli.pack(work / "pre.safetensors", tasks, single)
    tvq_cli.pack(work / "pre.safetensors", tasks, sharded, max_shard_size="100KB")
    return single, next(sharded.glob("*.tvq.index.json"))


def commands(single: Path, index: Path) -> list[tuple[str, list[str]]]:
    tvq = ["-m", "tvq_cli"]
    return [
        ("python -c pass", ["-c", "pass"]),
        ("python -c 'import torch'", ["-c", "import torch"]),
        ("tvq --version", [*tvq, "--version"]),
        ("tvq --help", [*tvq, "--help"]),
        ("tvq pack --help", [*tvq, "pack", "--help"]),
        ("tvq merge --help", [*tvq, "merge", "--help"]),
        ("tvq inspect A.tvq", [*tvq, "inspect", str(single)]),
        ("tvq inspect A.tvq --json", [*tvq, "inspect", str(single), "--json"]),
        ("tvq inspect A.tvq.index.json --json", [*tvq, "inspect", str(index), "--json"]),
    ]


def timed(args: list[str], source: Path) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of `python ARGS` with tvq from
    `source`."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, cwd=source, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def measure(runs: int, sources: dict[str, Path], single: Path, index: Path) -> str:
    """The markdown table: per command and source, median wall and CPU seconds."""
    header = ["command"] + [f"{name} {what}" for name in sources for what in ("wall s", "CPU s")]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, args in commands(single, index):
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sources}
        for _ in range(runs):
            for name, source in sources.items():  # interleaved: both meet the same load
                times[name].append(timed(args, source))
        cells = [label]
        for name in sources:
            cells.append(f"{statistics.median(w for w, _ in times[name]):.3f}")
            cells.append(f"{statistics.median(c for _, c in times[name]):.3f}")
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each command (median)")
    parser.add_argument("--before", type=Path, help="another checkout of tvq to compare with")
    parser.add_argument("--write", action="store_true", help="write docs/performance.md")
    args = parser.parse_args()
    sources = {"before": args.before.resolve()} if args.before else {}
    sources["now"] = ROOT
    with tempfile.TemporaryDirectory() as tmp:
        single, index = make_archives(Path(tmp))
        table = measure(args.runs, sources, single, index)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    body = f"{table}\n\nMedian of {args.runs} runs each; load average {load} after the runs."
    if args.write:
        write_section(ROOT / "docs" / "performance.md", "startup", body)
    print(body)


if __name__ == "__main__":
    main()
