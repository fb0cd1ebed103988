"""`tvq pack --ray` and `tvq merge --ray` against one process, with 1 and 2 Ray workers.

Usage (from the repository root; needs the ray extra, `pip install -e ".[ray]"`):

    PYTHONPATH=$PWD nice -n 10 python benchmarks/bench_ray.py
    PYTHONPATH=$PWD nice -n 10 python benchmarks/bench_ray.py --tensors 32 --tasks 8

The model: TENSORS bf16 tensors of 2048 x 2048 (random, std 0.02); each of TASKS fine-tunes
adds its own random task vector (std 1e-3). Inputs are built under a temporary folder and read
once before timing (so every run reads from the page cache). Pack: TVQ 4-bit with the default
settings into a sharded archive of about 4 shards; merge: task
arithmetic into a model folder of 4 shards. Each is timed as a library call in this
process:

- one process, --threads 1 and --threads 2 (the single-process baseline);
- Ray with a local cluster of 1 and of 2 worker CPUs (`ray.init(num_cpus=N)`, started before
  the clock: its start-up is printed apart), one task per shard, 1 thread each: first with new
  workers (each imports torch and tvq, as in one `tvq pack --ray` command), then again with the
  same, warm workers (the steady state of a long-lived cluster).

Every Ray output is checked byte for byte against the single-process one. Speed-up = one
process with 1 thread / the run. The machine's load average is printed: on a shared machine
other jobs take cores from the run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tvq_cli.merge import MergeRequest, merge
from tvq_cli.pack import pack

SIDE = 2048


def build(folder: Path, tensors: int, tasks: int) -> tuple[Path, list[Path]]:
    generator = torch.Generator().manual_seed(0)
    pre = {
        f"layers.{i}.weight": (torch.randn(SIDE, SIDE, generator=generator) * 0.02).bfloat16()
        for i in range(tensors)
    }
    pre_path = folder / "pre.safetensors"
    save_file(pre, str(pre_path))
    paths = []
    for t in range(tasks):
        ft = {
            name: (w.float() + torch.randn(w.shape, generator=generator) * 1e-3).bfloat16()
            for name, w in pre.items()
        }
        paths.append(folder / f"ft{t}.safetensors")
        save_file(ft, str(paths[-1]))
    return pre_path, paths


def digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    with tempfile.TemporaryDirectory(prefix="tvq-ray-", dir="/tmp") as tmp:
        root = Path(tmp)
        pre, fts = build(root, args.tensors, args.tasks)
        for path in [pre, *fts]:
            path.read_bytes()  # into the page cache
        model_bytes = pre.stat().st_size
        shard = f"{model_bytes * args.tasks // 12}B"  # the archive (about T / 3 models) in 4
        model_shard = f"{model_bytes // 4}B"

        def do_pack(out: Path, threads: int | None, address: str | None) -> None:
            pack(pre, fts, out, max_shard_size=shard, threads=threads, ray=address)

        def do_merge(archive: Path, out: Path, threads: int | None, address: str | None) -> None:
            request = MergeRequest(
                [archive], pre, out, "task_arithmetic", max_shard_size=model_shard,
                threads=threads, ray=address,
            )  # fmt: skip
            merge(request)

        runs: list[tuple[str, float, float]] = []
        reference = None
        for threads in (1, 2):
            folder = root / f"one-{threads}"
            folder.mkdir()
            seconds_pack = timed(lambda f=folder, t=threads: do_pack(f / "a.tvq", t, None))
            seconds_merge = timed(
                lambda f=folder, t=threads: do_merge(f / "a.tvq", f / "merged", t, None)
            )
            runs.append((f"one process, {threads} thread(s)", seconds_pack, seconds_merge))
            reference = reference or (digest(folder / "a.tvq"), digest(folder / "merged"))
        for cpus in (1, 2):
            temp = tempfile.mkdtemp(prefix="tvqray-", dir="/tmp")
            start = time.perf_counter()
            ray.init(
                num_cpus=cpus,
                object_store_memory=200 * 2**20,
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=temp,
            )
            startup = time.perf_counter() - start
            for state in ("new", "warm"):  # warm: the workers of the run before, imports done
                folder = root / f"ray-{cpus}-{state}"
                folder.mkdir()
                seconds_pack = timed(lambda f=folder: do_pack(f / "a.tvq", None, "local"))
                seconds_merge = timed(
                    lambda f=folder: do_merge(f / "a.tvq", f / "merged", None, "local")
                )
                same = (digest(folder / "a.tvq"), digest(folder / "merged")) == reference
                if not same:
                    raise SystemExit(f"Ray with {cpus} CPU(s) wrote different bytes")
                runs.append((f"Ray, {cpus} CPU(s), {state} workers", seconds_pack, seconds_merge))
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
            print(f"(local Ray cluster of {cpus} CPU(s) started in {startup:.1f} s)")
        shards = len(list((root / "one-1" / "a.tvq").glob("*.tvq")))
        print(
            f"{args.tensors} tensors of {SIDE}x{SIDE} bf16, {args.tasks} tasks: "
            f"{(1 + args.tasks) * model_bytes / 1e9:.2f} GB of inputs, archive of {shards} shards;"
            f" torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        base_pack, base_merge = runs[0][1], runs[0][2]
        print(f"{'run':<32} {'pack s':>7} {'speed-up':>8} {'merge s':>8} {'speed-up':>8}")
        for name, p, m in runs:
            print(f"{name:<32} {p:>7.2f} {base_pack / p:>7.2f}x {m:>8.2f} {base_merge / m:>7.2f}x")
        print("every Ray output is byte-identical to the single-process one")


if __name__ == "__main__":
    main()
