"""Benchmark `tvq merge` from a TVQ archive against mergekit from the full checkpoints.

Usage (from the repository root; mergekit lives in its own virtual environment, never in the
project's, with torch pinned to the version installed here):

    python3 -m venv /tmp/mk-venv
    /tmp/mk-venv/bin/pip install torch==2.13.0 && /tmp/mk-venv/bin/pip install mergekit==0.1.5
    PYTHONPATH=$PWD python benchmarks/bench_merge.py --mergekit /tmp/mk-venv/bin/mergekit-yaml \\
        [--inputs /tmp/tvq-bench/m] [--config small] [--reps 2] [--methods task_arithmetic]

Inputs: the ~1.1B-parameter bf16 TinyLlama-shaped pretrained model and 4 fine-tunes of
`bench_pack.py` (same builder, sharded, plus a `config.json` mergekit needs to recognise the
architecture), and a TVQ archive of the fine-tunes packed with the default settings (4-bit,
groups of 128, searched ranges, 6-bit log-coded scales, zstd codes). Built on first use and
deleted afterwards unless `--inputs` keeps them.

For task arithmetic (lambda 0.3) and TIES (top 20%, lambda 0.3), `--reps` rounds of: mergekit's
merge from the five checkpoints (`mergekit-yaml`, CPU, offline), then `tvq merge` from the
archive plus the pretrained model, each in a child process, one right after the other, so the
two share the machine's load. For each run it prints the wall time of the whole command
(Python, torch and for mergekit transformers start-up included), its CPU time (user + system,
of the child), peak RSS, and the load average; then the ratios tvq / mergekit of wall and of
CPU time per round, and their medians: on a shared machine the ratios measured side by side
are the figures to compare. tvq's peak RSS is checked against the memory bound
(T + 3) x the largest tensor in fp32 + 300 MB (exit 1 when a run breaks it).

mergekit differs in method details (docs/performance.md): it merges the exact fine-tunes, tvq
the 4-bit task vectors; its TIES trims each tensor by its own top 20%, tvq's by the model-wide
top 20% by default, which costs three streaming statistics passes over the archive.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pack import CHILD, CONFIGS, llama_shapes, numel, write_sharded

LAMBDA, DENSITY = 0.3, 0.2
METHODS = ("task_arithmetic", "ties")


def llama_config(vocab: int, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int):
    """A transformers config.json for the shapes of `llama_shapes` (mergekit reads it)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }


def mergekit_config(method: str, pre: Path, fts: list[Path]) -> str:
    """mergekit's YAML for our settings: lambda 0.3 on unit weights; TIES keeps 20% (density)
    and takes the disjoint mean (normalize, its default), scaled by lambda."""
    if method == "task_arithmetic":
        params = [{"weight": LAMBDA} for _ in fts]
        extra: dict = {"parameters": {"normalize": False}}
    else:
        params = [{"weight": 1.0, "density": DENSITY} for _ in fts]
        extra = {"parameters": {"normalize": True, "lambda": LAMBDA}}
    doc = {
        "merge_method": method,
        "base_model": str(pre),
        "models": [{"model": str(f), "parameters": p} for f, p in zip(fts, params, strict=True)],
        "dtype": "bfloat16",
        **extra,
    }
    return json.dumps(doc, indent=2)  # JSON is YAML


class Run:
    """One child process: wall and CPU seconds, peak RSS, stderr, load average at its end."""

    def __init__(self, cmd: list[str], env: dict | None = None):
        wrapped = ["/usr/bin/time", "-f", "TIME_CPU=%U+%S MAXRSS_KB=%M", *cmd]
        start = time.perf_counter()
        proc = subprocess.run(wrapped, capture_output=True, text=True, env=env)
        self.wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
        tail = proc.stderr.rsplit("TIME_CPU=", 1)[1].split()
        user, system = tail[0].split("+")
        self.cpu = float(user) + float(system)
        self.rss = int(tail[1].split("=")[1]) * 1024
        self.stderr = proc.stderr
        self.load = os.getloadavg()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tinyllama")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--root", type=Path, default=Path("/tmp/tvq-bench"))
    parser.add_argument("--inputs", type=Path, help="keep the inputs here and reuse them")
    parser.add_argument("--mergekit", default="/tmp/mk-venv/bin/mergekit-yaml")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reps", type=int, default=2, help="rounds of mergekit then tvq")
    opts = parser.parse_args()

    shapes = list(llama_shapes(**CONFIGS[opts.config]))
    params = sum(numel(s) for _, s in shapes)
    largest = max(numel(s) for _, s in shapes) * 4
    opts.root.mkdir(parents=True, exist_ok=True)
    work = opts.inputs or Path(tempfile.mkdtemp(dir=opts.root))
    work.mkdir(parents=True, exist_ok=True)
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        start = time.perf_counter()
        models = [work / "pretrained"] + [work / f"task{t}" for t in range(1, opts.tasks + 1)]
        for m, folder in enumerate(models):
            if not (folder / "model.safetensors.index.json").exists():
                write_sharded(folder, shapes, m)
            config = json.dumps(llama_config(**CONFIGS[opts.config]))
            (folder / "config.json").write_text(config)
        archive = work / "tasks.tvq"
        if not archive.exists():
            pack = [sys.executable, "-m", "tvq_cli", "pack", *map(str, models[1:])]
            pack += ["--pretrained", str(models[0]), "-o", str(archive), "-q"]
            subprocess.run(pack, check=True)
        print(
            f"inputs {opts.config}: {params:,} parameters, {len(models)} bf16 models; "
            f"archive {archive.stat().st_size / 1e6:.0f} MB, default settings (ready in "
            f"{time.perf_counter() - start:.0f} s)"
        )
        bound = (opts.tasks + 3) * largest + 300 * 2**20
        print(f"cores {len(os.sched_getaffinity(0))}; tvq memory bound {bound / 2**20:.0f} MiB\n")
        print(
            "| method | round | mergekit wall s | mergekit CPU s | mergekit RSS MiB "
            "| tvq wall s (after imports) | tvq CPU s | tvq RSS MiB | tvq / mergekit wall "
            "| tvq / mergekit CPU | load |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        failed = False
        ratios: dict[str, list[tuple[float, float]]] = {}
        for rep in range(1, opts.reps + 1):
            for method in opts.methods.split(","):
                out = work / f"out-{method}"
                yaml = work / f"{method}.yaml"
                yaml.write_text(mergekit_config(method, models[0], models[1:]))
                shutil.rmtree(out, ignore_errors=True)
                mk = Run(
                    [opts.mergekit, str(yaml), str(out), "--no-cuda", "--quiet"]
                    + ["--no-copy-tokenizer"],
                    env=offline,
                )
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-c", CHILD, "merge", str(archive), "--pretrained"]
                cmd += [str(models[0]), "--method", method, "-o", str(out), "--force", "-q"]
                tvq = Run(cmd)
                shutil.rmtree(out, ignore_errors=True)
                inside = float(tvq.stderr.split("TVQ_SECONDS=")[1].split()[0])
                failed |= tvq.rss > bound
                over = " (over bound)" if tvq.rss > bound else ""
                wall, cpu = tvq.wall / mk.wall, tvq.cpu / mk.cpu
                ratios.setdefault(method, []).append((wall, cpu))
                print(
                    f"| {method} | {rep} | {mk.wall:.1f} | {mk.cpu:.1f} | {mk.rss / 2**20:.0f} "
                    f"| {tvq.wall:.1f} ({inside:.1f}) | {tvq.cpu:.1f} "
                    f"| {tvq.rss / 2**20:.0f}{over} | {wall:.3f} | {cpu:.3f} "
                    f"| {(mk.load + tvq.load) / 2:.1f} |",
                    flush=True,
                )
        print()
        for method, pairs in ratios.items():
            wall = statistics.median(w for w, _ in pairs)
            cpu = statistics.median(c for _, c in pairs)
            print(f"{method}: tvq / mergekit median over {len(pairs)} rounds: wall {wall:.3f}, "
                  f"CPU {cpu:.3f}")  # fmt: skip
        return 1 if failed else 0
    finally:
        if opts.inputs is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
