"""Peak memory of `tvq pack` and `tvq merge` against the number of tasks T and the tensor size.

Usage (from the repository root; builds its inputs under a temporary folder and deletes them):

    PYTHONPATH=$PWD nice -n 10 python benchmarks/memory_tasks.py                # both sweeps
    PYTHONPATH=$PWD nice -n 10 python benchmarks/memory_tasks.py --tasks 2 10 --rows 8192
    PYTHONPATH=$PWD nice -n 10 python benchmarks/memory_tasks.py --sweep size --rows 8192 128256

The model is one large bf16 tensor of ROWS x 4096 (128256 x 4096 is Llama-3's embedding, 1 GB
in bf16) plus two small tensors (a 4096 x 4096 bf16 weight and a 4096 fp32 norm). The
pretrained tensor is random (std 0.02); fine-tune t adds its own random task vector (std 1e-3)
and is rounded back to bf16. Fine-tunes are written once for the largest T of a sweep and the
first T of them are used for each smaller T.

Each command runs as a child process under `/usr/bin/time -f "%M %e"`: peak RSS (max resident
set size) and wall time, Python start-up included. Commands: `tvq pack` with the default
settings (TVQ 4-bit), `tvq pack --scheme rtvq`, `tvq merge` of the default archive by task
arithmetic and by TIES into a .safetensors file, and TIES of the RTVQ archive ("merge rtvq ties",
not run unless asked for).

Disk: T fine-tunes of the full 128256-row tensor take (T + 1) GB (51 GB at T = 50, more than the
machine this was written on had free). `--distinct N` writes N distinct fine-tunes and makes the
others hard links of them under their own names: tvq reads each task's file as it would any
other (the page cache may hold a file read before, which RSS does not count), so T = 50 of the
full tensor needs N + 1 GB. Merges alone (`--commands "merge ta" "merge ties"`) pack their
archive first, unmeasured:

    PYTHONPATH=$PWD nice -n 10 python benchmarks/memory_tasks.py --sweep tasks --rows 128256 \
        --tasks 2 10 50 --distinct 5
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

COLS = 4096
PACK = ["pack", "{fts}", "--pretrained", "{pre}"]
MERGE = ["merge", "{dir}/tvq.tvq", "--pretrained", "{pre}", "-m"]
MERGE_RTVQ = ["merge", "{dir}/rtvq.tvq", "--pretrained", "{pre}", "-m"]
COMMANDS = {
    "pack tvq": [*PACK, "-o", "{dir}/tvq.tvq"],
    "pack rtvq": [*PACK, "-o", "{dir}/rtvq.tvq", "--scheme", "rtvq"],
    "merge ta": [*MERGE, "task_arithmetic", "-o", "{dir}/ta.safetensors"],
    "merge ties": [*MERGE, "ties", "-o", "{dir}/ties.safetensors"],
    "merge rtvq ties": [*MERGE_RTVQ, "ties", "-o", "{dir}/rtvq-ties.safetensors"],
}


def random_bf16(rows: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """A rows x COLS bf16 tensor of normal noise, made in slices (no whole fp32 copy)."""
    out = torch.empty(rows, COLS, dtype=torch.bfloat16)
    step = 8192
    for first in range(0, rows, step):
        block = torch.randn(min(step, rows - first), COLS, generator=generator) * std
        out[first : first + block.shape[0]] = block
    return out


def build(folder: Path, rows: int, tasks: int, distinct: int | None) -> tuple[Path, list[Path]]:
    """The pretrained checkpoint and `tasks` fine-tunes of it, one file each (all but the first
    `distinct` hard links of those)."""
    generator = torch.Generator().manual_seed(0)
    pre = {
        "embed.weight": random_bf16(rows, 0.02, generator),
        "layer.weight": random_bf16(COLS, 0.02, generator),
        "norm.weight": torch.ones(COLS),
    }
    pre_path = folder / "pre.safetensors"
    save_file(pre, str(pre_path))
    paths = []
    for t in range(tasks):
        if distinct is not None and t >= distinct:
            paths.append(folder / f"ft{t:02d}.safetensors")
            paths[-1].hardlink_to(paths[t % distinct])
            continue
        ft = {}
        for name, tensor in pre.items():
            if tensor.dtype == torch.bfloat16:
                noise = random_bf16(tensor.shape[0], 1e-3, generator)
                ft[name] = (tensor.float() + noise.float()).to(torch.bfloat16)
                del noise
            else:
                ft[name] = tensor + 1e-3 * torch.randn(tensor.shape, generator=generator)
        path = folder / f"ft{t:02d}.safetensors"
        save_file(ft, str(path))
        del ft
        paths.append(path)
    return pre_path, paths


def measure(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) of `tvq ARGV` in a child process."""
    command = ["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "tvq_cli", *argv, "-q"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stderr}")
    kb, seconds = proc.stderr.strip().splitlines()[-1].split()
    return int(kb) / 1e6, float(seconds)


def run_case(folder: Path, pre: Path, fts: list[Path], commands: list[str]) -> dict:
    """Each command's (peak RSS, wall); merges need their archive (TVQ, or RTVQ), packed first
    (unmeasured) when its pack is not among the commands."""
    out = folder / "out"
    out.mkdir()

    def argv(name: str) -> list[str]:
        args = []
        for arg in COMMANDS[name]:
            if arg == "{fts}":
                args += [str(p) for p in fts]
            else:
                args.append(arg.format(pre=pre, dir=out))
        return args

    merges = [c for c in commands if c.startswith("merge")]
    if "pack tvq" not in commands and any(c.startswith("merge t") for c in merges):
        measure(argv("pack tvq"))
    if "pack rtvq" not in commands and "merge rtvq ties" in merges:
        measure(argv("pack rtvq"))
    results = {name: measure(argv(name)) for name in commands}
    shutil.rmtree(out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", choices=["tasks", "size", "both"], default="both")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 50])
    parser.add_argument("--rows", type=int, nargs="+", default=None)
    default = [c for c in COMMANDS if c != "merge rtvq ties"]
    parser.add_argument("--commands", nargs="+", default=default, choices=list(COMMANDS))
    parser.add_argument("--root", type=Path, default=None, help="where to build the inputs")
    parser.add_argument(
        "--distinct", type=int, default=None, help="distinct fine-tunes (the rest hard links)"
    )
    args = parser.parse_args()
    sweeps = ["tasks", "size"] if args.sweep == "both" else [args.sweep]
    rows_of = {"tasks": args.rows or [8192], "size": args.rows or [8192, 32768, 128256]}
    print(f"torch {torch.__version__}; peak RSS (GB) / wall (s) of each command")
    print(
        f"{'rows x 4096':>12} {'T':>3} {'GB in':>6} " + " ".join(f"{c:>16}" for c in args.commands)
    )
    for sweep in sweeps:
        cases = (
            [(rows_of[sweep][0], t) for t in args.tasks]
            if sweep == "tasks"
            else [(r, min(args.tasks)) for r in rows_of[sweep]]
        )
        built: tuple[int, int] | None = None
        with tempfile.TemporaryDirectory(prefix="tvq-mem-", dir=args.root) as tmp:
            folder = Path(tmp)
            for rows, tasks in cases:
                needed = max(t for r, t in cases if r == rows)
                if built is None or built[0] != rows:
                    for f in folder.glob("*.safetensors"):
                        f.unlink()
                    pre, fts = build(folder, rows, needed, args.distinct)
                    built = (rows, needed)
                gb_in = sum(p.stat().st_size for p in [pre, *fts[:tasks]]) / 1e9  # as read
                results = run_case(folder, pre, fts[:tasks], args.commands)
                cells = " ".join(f"{r:>7.2f} /{s:>6.1f}s" for r, s in results.values())
                print(f"{rows:>12} {tasks:>3} {gb_in:>6.1f} {cells}", flush=True)


if __name__ == "__main__":
    main()
