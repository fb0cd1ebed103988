"""Benchmark `tvq merge` from a TVQ archive against mergekit from the full checkpoints.

Usage (from the repository root; mergekit lives in its own virtual environment, never in the
project's, with torch pinned to the version installed here):

    python3 -m venv /tmp/mk-venv
    /tmp/mk-venv/bin/pip install torch==2.13.0 mergekit
    PYTHONPATH=$PWD python benchmarks/bench_merge.py --mergekit /tmp/mk-venv/bin/mergekit-yaml \\
        [--inputs /tmp/tvq-bench/m] [--config small]

Inputs: the ~1.1B-parameter bf16 TinyLlama-shaped pretrained model and 4 fine-tunes of
`bench_pack.py` (same builder, sharded, plus a `config.json` mergekit needs to recognise the
architecture), and a TVQ archive of the fine-tunes packed with default settings (4-bit, groups
of 128, 6-bit log-coded scales, zstd codes) except `--range minmax`: the default least-squares
range search makes packing several times slower but stores exactly the same kinds of parts, so
merging reads and decodes the same amount. Built on first use and deleted afterwards unless
`--inputs` keeps them.

For task arithmetic (lambda 0.3) and TIES (top 20%, lambda 0.3) it runs, each in a child
process, mergekit's merge from the five checkpoints (`mergekit-yaml`, CPU) and `tvq merge`
from the archive plus the pretrained model, and prints the command's wall time, throughput in
GB/s of fp32-equivalent input ((T + 1) x parameters x 4 bytes: what both merges stand for),
peak RSS (VmHWM / ru_maxrss of the child), and the time of `cat`-ing each side's input files
to /dev/null measured just before. It checks tvq's peak RSS against the memory bound
(T + 3) x the largest tensor in fp32 + 300 MB and exits 1 when a run breaks it.

mergekit differs in method details (docs/performance.md, /work/shared/reference): its TIES
trims per tensor, ours by default over the whole model (three more streaming passes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pack import CHILD, CONFIGS, cat_seconds, llama_shapes, numel, write_sharded

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
        extra: dict = {}
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


def timed_child(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in bytes (of this child alone) and stderr of one command."""
    wrapped = ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *cmd]
    start = time.perf_counter()
    proc = subprocess.run(wrapped, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    rss = int(proc.stderr.rsplit("MAXRSS_KB=", 1)[1].split()[0]) * 1024
    return seconds, rss, proc.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tinyllama")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--root", type=Path, default=Path("/tmp/tvq-bench"))
    parser.add_argument("--inputs", type=Path, help="keep the inputs here and reuse them")
    parser.add_argument("--mergekit", default="/tmp/mk-venv/bin/mergekit-yaml")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--skip-mergekit", action="store_true")
    opts = parser.parse_args()

    shapes = list(llama_shapes(**CONFIGS[opts.config]))
    params = sum(numel(s) for _, s in shapes)
    largest = max(numel(s) for _, s in shapes) * 4
    opts.root.mkdir(parents=True, exist_ok=True)
    work = opts.inputs or Path(tempfile.mkdtemp(dir=opts.root))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        models = [work / "pretrained"] + [work / f"task{t}" for t in range(1, opts.tasks + 1)]
        for m, folder in enumerate(models):
            if not (folder / "model.safetensors.index.json").exists():
                write_sharded(folder, shapes, m)
            config = json.dumps(llama_config(**CONFIGS[opts.config]))
            (folder / "config.json").write_text(config)
        archive = work / "tasks4bit.tvq"
        if not archive.exists():
            pack = [sys.executable, "-m", "tvq_cli", "pack", *map(str, models[1:])]
            pack += ["--pretrained", str(models[0]), "-o", str(archive), "-q", "--range", "minmax"]
            subprocess.run(pack, check=True)
        print(
            f"inputs {opts.config}: {params:,} parameters, {len(models)} bf16 models; "
            f"archive {archive.stat().st_size / 1e6:.0f} MB (ready in "
            f"{time.perf_counter() - start:.0f} s)"
        )
        fp32_bytes = len(models) * params * 4
        bound = (opts.tasks + 3) * largest + 300 * 2**20
        print(f"fp32-equivalent input {fp32_bytes / 1e9:.2f} GB; bound {bound / 2**20:.0f} MiB\n")
        print(
            "| method | tool | input | wall s | GB/s fp32-eq | peak RSS MiB | cat s | wall / cat |"
        )
        print("|---|---|---|---|---|---|---|---|")
        pre_files = sorted(models[0].glob("*.safetensors"))
        failed = False
        for method in opts.methods.split(","):
            out = work / f"out-{method}"
            if not opts.skip_mergekit:
                yaml = work / f"{method}.yaml"
                yaml.write_text(mergekit_config(method, models[0], models[1:]))
                cat = cat_seconds(models)
                shutil.rmtree(out, ignore_errors=True)
                cmd = [opts.mergekit, str(yaml), str(out), "--no-cuda", "--quiet"]
                seconds, rss, _ = timed_child(cmd)
                print(
                    f"| {method} | mergekit | 5 bf16 checkpoints | {seconds:.1f} | "
                    f"{fp32_bytes / seconds / 1e9:.2f} | {rss / 2**20:.0f} | {cat:.1f} | "
                    f"{seconds / cat:.1f} |",
                    flush=True,
                )
                shutil.rmtree(out, ignore_errors=True)
            files = [str(p) for p in [archive, *pre_files]]
            t0 = time.perf_counter()
            subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
            cat = time.perf_counter() - t0
            cmd = [sys.executable, "-c", CHILD, "merge", str(archive), "--pretrained"]
            cmd += [str(models[0]), "--method", method, "-o", str(out), "--force", "-q"]
            seconds, rss, err = timed_child(cmd)
            inside = float(err.split("TVQ_SECONDS=")[1].split()[0])
            failed |= rss > bound
            over = " (over bound)" if rss > bound else ""
            print(
                f"| {method} | tvq merge | archive + pretrained | {seconds:.1f} "
                f"({inside:.1f} after imports) | {fp32_bytes / seconds / 1e9:.2f} | "
                f"{rss / 2**20:.0f}{over} | {cat:.1f} | {seconds / cat:.1f} |",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
        return 1 if failed else 0
    finally:
        if opts.inputs is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
