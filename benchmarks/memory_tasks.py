"""Peak memory of `tvq pack` and `tvq merge` against the number of tasks T and the tensor size.

Usage (from the repository root; builds its inputs under a temporary folder and deletes them):

    PYTHONPATH=$PWD nice -n 10 python benchmarks/memory_tasks.py                # both sweeps
    PYTHONPATH=$PWD nice -n 10 python benchmarks/memory_tasks.py --tasks 2 10 --rows 8192
    PYTHONPATH=$PWD nice -n 10 python benchmarks/memory_tasks.py --sweep size --rows 8192 128256
    PYTHONPATH=$PWD nice -n 10 python benchmarks/memory_tasks.py --sweep size --rows 128256 \
        --tasks 50 --commands "merge ta" "merge ties" --replicate 25

The model is one large bf16 tensor of ROWS x 4096 (128256 x 4096 is Llama-3's embedding, 1 GB
in bf16) plus two small tensors (a 4096 x 4096 bf16 weight and a 4096 fp32 norm). The
pretrained tensor is random (std 0.02); fine-tune t adds its own random task vector (std 1e-3)
and is rounded back to bf16. Fine-tunes are written once for the largest T of a sweep and the
first T of them are used for each smaller T.

Each command runs as a child process under `/usr/bin/time -f "%M %e"`: peak RSS (max resident
set size) and wall time, Python start-up included. Commands: `tvq pack` with the default
settings (TVQ 4-bit), `tvq pack --scheme rtvq`, and `tvq merge` of the default archive by task
arithmetic and by TIES into a .safetensors file.

Disk: T fine-tunes of the full 128256-row tensor take (T + 1) GB (51 GB at T = 50, more than the
machine this was written on had free), so the task sweep (`--sweep tasks`, T = 2, 10, 50) runs
at a fixed smaller row count, and the size sweep (`--sweep size`, T = 2) shows the growth with
the tensor's size up to the full 128256 rows. Merges alone (`--commands "merge ta" "merge
ties"`) can take T tasks at the full size with `--replicate N`: T / N fine-tunes are packed and
the archive's tasks copied N times over (`replicate_tasks`), so a merge of T = 50 tasks needs
two fine-tunes on disk and a 12 GB archive.
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
COMMANDS = {
    "pack tvq": [*PACK, "-o", "{dir}/tvq.tvq"],
    "pack rtvq": [*PACK, "-o", "{dir}/rtvq.tvq", "--scheme", "rtvq"],
    "merge ta": [*MERGE, "task_arithmetic", "-o", "{dir}/ta.safetensors"],
    "merge ties": [*MERGE, "ties", "-o", "{dir}/ties.safetensors"],
}


def random_bf16(rows: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """A rows x COLS bf16 tensor of normal noise, made in slices (no whole fp32 copy)."""
    out = torch.empty(rows, COLS, dtype=torch.bfloat16)
    step = 8192
    for first in range(0, rows, step):
        block = torch.randn(min(step, rows - first), COLS, generator=generator) * std
        out[first : first + block.shape[0]] = block
    return out


def build(folder: Path, rows: int, tasks: int) -> tuple[Path, list[Path]]:
    """The pretrained checkpoint and `tasks` fine-tunes of it, one file each."""
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


def replicate_tasks(source: Path, target: Path, times: int) -> None:
    """An archive of `source`'s tasks `times` over (copy k of task t named t_k), its stored
    bytes copied: T tasks for a merge from T / times fine-tunes on disk (50 fine-tunes of the
    full tensor are 51 GB). A merge's memory and time do not depend on the values repeating."""
    from dataclasses import replace

    from tvq_cli.archive.reader import Archive
    from tvq_cli.archive.writer import ArchiveWriter

    archive = Archive(source)
    header, scheme = archive.header, archive.scheme
    copies = {f"{t}_{k}": t for k in range(times) for t in header.tasks}

    def parts(entry):
        shared = [p for p in entry.parts if p.task is None]
        own = {p.task: p for p in entry.parts if p.task is not None}
        return shared + [replace(own[t], role=scheme.task_role(n)) for n, t in copies.items()]

    tensors = [replace(e, parts=parts(e)) if e.parts else e for e in header.tensors]
    infos = {n: header.info(t) for n, t in copies.items()}
    new = replace(header, tasks=list(copies), tensors=tensors, task_info=infos)

    def old_key(key: str) -> str:
        kind, rest = key.split(":", 1)
        task, tail = rest.split(":", 1) if ":" in rest else (rest, "")
        return f"{kind}:{copies[task]}:{tail}" if task in copies else key

    with ArchiveWriter(target, new) as writer:
        for stored in writer.stored:
            writer.write(stored.key, archive.raw(old_key(stored.key)))
    archive.close()


def measure(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) of `tvq ARGV` in a child process."""
    command = ["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "tvq_cli", *argv, "-q"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stderr}")
    kb, seconds = proc.stderr.strip().splitlines()[-1].split()
    return int(kb) / 1e6, float(seconds)


def run_case(
    folder: Path, pre: Path, fts: list[Path], commands: list[str], replicate: int = 1
) -> dict:
    """Each command's (peak RSS, wall); merges need the TVQ archive, packed first (unmeasured)
    when "pack tvq" is not among the commands, its tasks `replicate` times over (`replicate`:
    len(fts) x replicate tasks)."""
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

    if "pack tvq" not in commands and any(c.startswith("merge") for c in commands):
        if replicate > 1:
            base = out / "base.tvq"
            measure(["pack", *map(str, fts), "--pretrained", str(pre), "-o", str(base)])
            replicate_tasks(base, out / "tvq.tvq", replicate)
            base.unlink()
        else:
            measure(argv("pack tvq"))
    results = {name: measure(argv(name)) for name in commands}
    shutil.rmtree(out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", choices=["tasks", "size", "both"], default="both")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 50])
    parser.add_argument("--rows", type=int, nargs="+", default=None)
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    parser.add_argument("--root", type=Path, default=None, help="where to build the inputs")
    parser.add_argument(
        "--replicate",
        type=int,
        default=1,
        help="merges only: their archive holds T / N fine-tunes' tasks N times over (T = 50 "
        "fine-tunes of the full tensor are 51 GB, and `tvq pack` of them would need more memory "
        "than this machine's 24 GB)",
    )
    args = parser.parse_args()
    if args.replicate > 1 and any(t % args.replicate for t in args.tasks):
        parser.error("--replicate must divide every --tasks")
    if args.replicate > 1 and not all(c.startswith("merge") for c in args.commands):
        parser.error("--replicate is for merges only (--commands 'merge ta' 'merge ties')")
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
                needed = max(t for r, t in cases if r == rows) // args.replicate
                if built is None or built[0] != rows:
                    for f in folder.glob("*.safetensors"):
                        f.unlink()
                    pre, fts = build(folder, rows, needed)
                    built = (rows, needed)
                distinct = fts[: tasks // args.replicate]
                gb_in = (pre.stat().st_size + tasks * fts[0].stat().st_size) / 1e9
                results = run_case(folder, pre, distinct, args.commands, args.replicate)
                cells = " ".join(f"{r:>7.2f} /{s:>6.1f}s" for r, s in results.values())
                print(f"{rows:>12} {tasks:>3} {gb_in:>6.1f} {cells}", flush=True)


if __name__ == "__main__":
    main()
