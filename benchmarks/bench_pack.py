"""Benchmark `tvq pack` on a ~1B-parameter bf16 model with 4 fine-tunes, against reading speed.

Usage (from the repository root; needs ~11 GB free under --root and about 2 minutes to build
the inputs, which are deleted afterwards unless --inputs names a folder to keep them in):

    PYTHONPATH=$PWD python benchmarks/bench_pack.py                  # TinyLlama-1.1B shapes
    PYTHONPATH=$PWD python benchmarks/bench_pack.py --config small   # a 30M smoke test
    PYTHONPATH=$PWD python benchmarks/bench_pack.py --config layer   # one 2048-wide layer
    PYTHONPATH=$PWD python benchmarks/bench_pack.py --py-spy         # also profile TVQ 4-bit
    PYTHONPATH=$PWD python benchmarks/bench_pack.py --inputs /tmp/tvq-bench/m  # keep, reuse

The model is built from a public architecture's shapes written out below (no download): random
bf16 weights (std 0.02) and, per fine-tune, a heavy-tailed task vector (product of two normals,
about 1e-3 of the weights' scale) rounded into bf16. Checkpoints are written tensor by tensor,
sharded Hugging Face style (model-0000k-of-0000n.safetensors + model.safetensors.index.json),
never holding a whole model in memory.

For each scheme (TVQ 4-bit, TVQ 2-bit, RTVQ 3+2-bit with the default settings: groups of 128,
searched ranges, 6-bit compact scales, zstd codes; TVQ 4-bit with the paper's settings:
one min-max range per tensor, fp32 scales, raw codes; and TVQ 4-bit with the defaults but raw
codes, to show what zstd costs) it runs `tvq pack` in a
child process and prints the command's wall time (Python and torch start-up included), the
time of the `tvq pack` command itself (imports excluded), throughput in GB/s of fp32-equivalent
input ((T + 1) models x parameters x 4 bytes) over that time, its CPU time (all threads) and
the throughput two fully used cores would give at that CPU time (on a shared machine other jobs
take cores from the run, not CPU time), peak RSS of the child (VmHWM), the time of `cat`-ing
the same input files to /dev/null measured just before, the ratio pack / cat, and the load
average. It also checks peak RSS against the memory bound
(T + 3) x the largest tensor in fp32 + 300 MB and exits 1 when a run breaks it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from paper_settings import PAPER_FLAGS  # benchmarks/ is the script's folder

CONFIGS = {
    # TinyLlama/TinyLlama-1.1B (config.json): 22 layers, hidden 2048, MLP 5632, 32 heads with
    # 4 key/value heads of 64, vocabulary 32000, untied lm_head: 1,100,048,384 parameters.
    "tinyllama": dict(vocab=32000, hidden=2048, mlp=5632, layers=22, heads=32, kv_heads=4),
    "small": dict(vocab=4096, hidden=512, mlp=1408, layers=8, heads=8, kv_heads=2),
    # one TinyLlama-sized layer (60M parameters): for quick comparisons while iterating
    "layer": dict(vocab=2048, hidden=2048, mlp=5632, layers=1, heads=32, kv_heads=32),
}
SHARD_BYTES = 1 << 30
SCHEMES = {
    "TVQ 4-bit": ["--scheme", "tvq", "--bits", "4"],
    "TVQ 2-bit": ["--scheme", "tvq", "--bits", "2"],
    "RTVQ 3+2-bit": ["--scheme", "rtvq", "--base-bits", "3", "--offset-bits", "2"],
    "TVQ 4-bit, paper settings": ["--scheme", "tvq", "--bits", "4", *PAPER_FLAGS],
    "TVQ 4-bit, raw codes": ["--scheme", "tvq", "--bits", "4", "--codec", "raw"],
    "TVQ 4-bit, format 2's zstd": ["--scheme", "tvq", "--bits", "4", "--codec", "zstd"],
}
CHILD = (  # `tvq` with its run time and CPU time (after imports) and peak RSS on stderr
    "import sys, time\n"
    "from tvq_cli.cli import main\n"
    "start, cpu = time.perf_counter(), time.process_time()\n"
    "code = main(sys.argv[1:])\n"
    "seconds, cpu = time.perf_counter() - start, time.process_time() - cpu\n"
    "hwm = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
    "print(f'TVQ_SECONDS={seconds} TVQ_CPU={cpu} VmHWM_KB={hwm}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def llama_shapes(vocab: int, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int):
    """(name, shape) of every tensor of a Llama-architecture checkpoint, in file order."""
    kv = hidden // heads * kv_heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (hidden, hidden)
        yield p + "self_attn.k_proj.weight", (kv, hidden)
        yield p + "self_attn.v_proj.weight", (kv, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, hidden)
        yield p + "mlp.gate_proj.weight", (mlp, hidden)
        yield p + "mlp.up_proj.weight", (mlp, hidden)
        yield p + "mlp.down_proj.weight", (hidden, mlp)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_plan(shapes: list[tuple[str, tuple]]) -> list[list[tuple[str, tuple]]]:
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = numel(shape) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return shards + [current]


def tensor_value(name: str, shape: tuple, model: int) -> torch.Tensor:
    """Model 0 is the pretrained one; model t > 0 adds task vector t. Deterministic per name."""
    seed = zlib.crc32(name.encode()) % 2**31
    gen = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        base = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    else:
        base = 0.02 * torch.randn(shape, generator=gen)
    if model == 0:
        return base.to(torch.bfloat16)
    gen.manual_seed(seed + 7919 * model)
    tail = torch.randn(shape, generator=gen).mul_(torch.randn(shape, generator=gen))
    scale = 1e-3 * (0.1 if len(shape) == 1 else 0.02)
    return base.add_(tail, alpha=scale).to(torch.bfloat16)


def write_sharded(folder: Path, shapes: list[tuple[str, tuple]], model: int) -> None:
    """Write one checkpoint shard by shard, tensor by tensor (header first, then the bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = shard_plan(shapes)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nbytes = numel(shape) * 2
            header[name] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                f.write(tensor_value(name, shape, model).view(torch.uint8).numpy().tobytes())
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def cat_seconds(folders: list[Path]) -> float:
    files = [str(p) for f in folders for p in sorted(f.glob("*.safetensors"))]
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def run_pack(pre: Path, fts: list[Path], out: Path, args: list[str], spy: Path | None):
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        "pack",
        *map(str, fts),
        "--pretrained",
        str(pre),
        "-o",
        str(out),
        "--force",
        "-q",
        *args,
    ]
    if spy is not None:
        cmd = [
            "py-spy",
            "record",
            "--threads",
            "--idle",
            "-f",
            "raw",
            "-r",
            "50",
            "-o",
            str(spy),
            "--",
            *cmd,
        ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"pack failed: {proc.stderr.strip()}")
    inside = float(proc.stderr.split("TVQ_SECONDS=")[1].split()[0])
    cpu = float(proc.stderr.split("TVQ_CPU=")[1].split()[0])
    hwm_kb = int(proc.stderr.split("VmHWM_KB=")[1].split()[0])
    return seconds, inside, cpu, hwm_kb * 1024


def summarize_profile(spy: Path, top: int = 15) -> str:
    """Share of samples per innermost tvq_cli/torch/numpy frame, across all threads."""
    own: dict[str, int] = {}
    total = 0
    for line in spy.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        leaf = next((f for f in reversed(frames) if "tvq_cli" in f), frames[-1])
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    rows = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    return "\n".join(f"{100 * n / total:5.1f}%  {name}" for name, n in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tinyllama")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--root", type=Path, default=Path("/tmp/tvq-bench"))
    parser.add_argument(
        "--inputs", type=Path, help="keep the generated checkpoints here and reuse them next time"
    )
    parser.add_argument("--py-spy", action="store_true", help="profile the TVQ 4-bit run")
    parser.add_argument(
        "--only", action="append", choices=sorted(SCHEMES), help="run only these schemes"
    )
    opts = parser.parse_args()

    shapes = list(llama_shapes(**CONFIGS[opts.config]))
    params = sum(numel(s) for _, s in shapes)
    largest = max(numel(s) for _, s in shapes) * 4
    opts.root.mkdir(parents=True, exist_ok=True)
    work = opts.inputs or Path(tempfile.mkdtemp(dir=opts.root))
    try:
        start = time.perf_counter()
        models = [work / "pretrained"] + [work / f"task{t}" for t in range(1, opts.tasks + 1)]
        for m, folder in enumerate(models):
            if not (folder / "model.safetensors.index.json").exists():
                write_sharded(folder, shapes, m)
        print(
            f"inputs {opts.config}: {params:,} parameters, {len(models)} bf16 models, "
            f"{len(list(models[0].glob('*.safetensors')))} shards each "
            f"(ready in {time.perf_counter() - start:.0f} s)"
        )
        fp32_bytes = len(models) * params * 4
        bound = (opts.tasks + 3) * largest + 300 * 2**20
        print(
            f"threads: {len(os.sched_getaffinity(0))}; fp32-equivalent input "
            f"{fp32_bytes / 1e9:.2f} GB; memory bound {bound / 2**20:.0f} MiB\n"
        )
        print(
            "| scheme | command s | pack s | GB/s fp32-eq | pack CPU s | GB/s per 2 CPU-s "
            "| peak RSS MiB | archive MB | cat s | pack / cat | load |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        failed = False
        for name, args in SCHEMES.items():
            if opts.only and name not in opts.only:
                continue
            cat = cat_seconds(models)
            spy = work / "profile.txt" if opts.py_spy and name == "TVQ 4-bit" else None
            seconds, inside, cpu, peak = run_pack(
                models[0], models[1:], work / "out.tvq", args, spy
            )
            failed |= peak > bound
            over = " (over bound)" if peak > bound else ""
            size = (work / "out.tvq").stat().st_size
            print(
                f"| {name} | {seconds:.1f} | {inside:.1f} | {fp32_bytes / inside / 1e9:.2f} | "
                f"{cpu:.1f} | {2 * fp32_bytes / cpu / 1e9:.2f} | {peak / 2**20:.0f}{over} | "
                f"{size / 1e6:.1f} | {cat:.1f} | {inside / cat:.1f} | {os.getloadavg()[0]:.1f} |",
                flush=True,
            )
        if opts.py_spy:
            print("\nprofile of TVQ 4-bit (share of CPU samples, all threads, import included):")
            print(summarize_profile(work / "profile.txt"))
        return 1 if failed else 0
    finally:
        (work / "out.tvq").unlink(missing_ok=True)
        if opts.inputs is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
