"""The store's costs: what `tvq add` costs RTVQ against packing all tasks again, and what the
small files and task records add per task.

1. On the example zoo (8 tasks), RTVQ with the defaults (base 3 bits, offsets 2): the first k
   tasks are packed and the other 8 - k added (`tvq add`), against packing all 8 at once;
   rel-L2 of the task vectors (the added tasks, the first ones, all) and the mean accuracy of
   task arithmetic and TIES merges. TVQ and FQ are checked to give the same bytes either way.
2. On tiny Hugging Face models (tests/hf_models.py; needs transformers and peft): the bytes
   of the small files kept per task (config, tokenizer, chat template) as files and as stored,
   and of its record in the header, for a plain fine-tune, one with added tokens and a LoRA
   adapter.
3. Speed on a synthetic 50M-parameter bf16 model (12 tensors of 2048 x 2048) with 4 fine-tunes:
   pack, add one task, remove one, extract one (folder), stream one (`task_tensors`), and the
   share of pack's CPU time that the fine-tunes' fingerprints take (sha256 of their bytes).
Writes the tables between the STORE markers of docs/cli.md and docs/performance.md.
Usage: PYTHONPATH=.:tests python benchmarks/store.py [--zoo DIR]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from doc_sections import write_section, zoo_benchmark  # benchmarks/ is the script's folder
from merged_accuracy import archive_vectors, merged_accuracy
from safetensors.torch import save_file

from tvq_cli import (
    PackOptions,
    add_tasks,
    extract,
    open_archive,
    pack,
    remove_tasks,
    task_tensors,
)
from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.stats import ErrorStats
from tvq_cli.zoo import Zoo

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
PERF = ROOT / "docs" / "performance.md"


def errors(archive: Path, zoo: Zoo, first: int) -> list[float | None]:
    """rel-L2 of the task vectors over the first `first` tasks, over the others, and over all."""
    pre, opened = Checkpoint(zoo.pretrained), open_archive(archive)
    groups = [ErrorStats(), ErrorStats(), ErrorStats()]
    for index, (task, path) in enumerate(zoo.tasks.items()):
        ft = Checkpoint(path)
        for name, spec in pre.specs.items():
            if spec.is_float:
                base = pre.load_float(name)
                tau, hat = ft.load_float(name) - base, opened.task_vector(task, name, base)
                groups[0 if index < first else 1].add(tau, hat)
                groups[2].add(tau, hat)
    return [g.as_dict()["rel_l2"] if g.count else None for g in groups]


def add_vs_repack(zoo: Zoo, work: Path) -> str:
    fts = list(zoo.tasks.values())
    options = PackOptions(scheme="rtvq")
    lines = [
        "| archive (RTVQ B3O2, 8 zoo tasks) | size | rel-L2 first k | rel-L2 added | "
        "rel-L2 all | TA acc % | TIES acc % |",
        "|---|---|---|---|---|---|---|",
    ]
    for first in (8, 6, 4, 2, 1):
        out = work / f"rtvq-{first}.tvq"
        pack(zoo.pretrained, fts[:first], out, options, overwrite=True)
        if first < 8:
            add_tasks(out, zoo.pretrained, fts[first:])
        old, new, overall = errors(out, zoo, first)
        taus = archive_vectors(out)
        accs = [merged_accuracy(zoo, taus, m) for m in ("task_arithmetic", "ties")]
        label = "packed at once" if first == 8 else f"{first} packed, {8 - first} added"
        size = open_archive(out).file_size
        added = "-" if first == 8 else f"{new:.4f}"
        lines.append(
            f"| {label} | {size / 1024:.1f} KiB | {old:.4f} | {added} | {overall:.4f} | "
            f"{accs[0]:.2f} | {accs[1]:.2f} |"
        )
        print(lines[-1], flush=True)
    for scheme in ("tvq", "fq"):
        a, b = work / f"{scheme}-all.tvq", work / f"{scheme}-added.tvq"
        pack(zoo.pretrained, fts, a, PackOptions(scheme=scheme), overwrite=True)
        pack(zoo.pretrained, fts[:4], b, PackOptions(scheme=scheme), overwrite=True)
        add_tasks(b, zoo.pretrained, fts[4:])
        same = a.read_bytes() == b.read_bytes()
        lines.append(f"\n{scheme.upper()}: 4 packed + 4 added gives the same bytes as 8: {same}.")
    return "\n".join(lines)


def small_files(work: Path) -> str:
    try:
        import hf_models
    except ImportError:
        return "(not measured: needs transformers and peft, the `hf` extra)"
    lines = [
        "| tiny model, task | files kept | as files | stored (zstd) | task record in header |",
        "|---|---|---|---|---|",
    ]
    for arch in ("llama", "qwen2", "gpt2"):
        root = work / arch
        root.mkdir()
        base = hf_models.make_base(root, arch, "base")
        tasks = {
            "fine-tune": hf_models.make_finetune(root, base, "ft"),
            "+2 tokens, ChatML": hf_models.make_finetune(root, base, "added", add_tokens=2),
            "LoRA adapter": hf_models.make_lora(root, base, "lora"),
        }
        for label, folder in tasks.items():
            out = root / f"{folder.name}.tvq"
            pack(base, [folder], out)
            header = open_archive(out).header
            info = header.info(folder.name)
            size = sum(header.files[s].size for s in info.files.values())
            stored = sum(header.files[s].stored for s in info.files.values())
            record = len(json.dumps(info.to_json(), separators=(",", ":")))
            lines.append(
                f"| {arch}, {label} | {len(info.files)} | {size:,} B | {stored:,} B | "
                f"{record:,} B |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines)


def speed(work: Path) -> str:
    """Seconds of each store operation on a 50M-parameter bf16 model, best of 3."""
    gen = torch.Generator().manual_seed(0)
    pre = {f"layers.{i}.w": torch.randn(2048, 2048, generator=gen) * 0.02 for i in range(12)}
    base = write_model(work / "pre", {k: v.bfloat16() for k, v in pre.items()})
    fts = [
        write_model(
            work / f"ft{t}",
            {
                k: (v + 1e-3 * torch.randn(v.shape, generator=gen)).bfloat16()
                for k, v in pre.items()
            },
        )
        for t in range(4)
    ]
    params = sum(v.numel() for v in pre.values())
    out, rows = work / "speed.tvq", []

    def best(label: str, run, reset=None) -> float:
        times = []
        for _ in range(3):
            if reset:
                reset()
            cpu, wall = time.process_time(), time.perf_counter()
            run()
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
        wall, cpu = min(times)
        rows.append(f"| {label} | {wall:.2f} | {cpu:.2f} |")
        return cpu

    pack_cpu = best("pack 4 tasks", lambda: pack(base, fts, out, overwrite=True, threads=2))
    packed3 = work / "three.tvq"

    def three() -> None:
        pack(base, fts[:3], packed3, overwrite=True, threads=2)

    best("add 1 task to 3", lambda: add_tasks(packed3, base, fts[3:], threads=2), three)
    best(
        "remove 1 task of 4",
        lambda: remove_tasks(packed3, ["ft3"]),
        lambda: shutil.copy(out, packed3),
    )
    target = work / "extracted"
    best(
        "extract 1 task (folder)",
        lambda: extract(out, "ft0", base, target),
        lambda: shutil.rmtree(target, ignore_errors=True),
    )
    best("stream 1 task (task_tensors)", lambda: sum(1 for _ in task_tensors(out, "ft0", base)))
    hashing = best(
        "fingerprints of the 4 fine-tunes", lambda: [Checkpoint(f).fingerprint() for f in fts]
    )
    return "\n".join(
        [
            f"{params / 1e6:.0f}M parameters in bf16, 4 fine-tunes, `--threads 2`, best of 3:",
            "",
            "| operation | wall s | CPU s |",
            "|---|---|---|",
            *rows,
            "",
            f"The fine-tunes' fingerprints are {100 * hashing / pack_cpu:.0f}% of pack's CPU "
            "time (hashed on a thread of their own, beside the quantization).",
        ]
    )


def write_model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def measure(zoo: Zoo, work: Path) -> str:
    write_section(PERF, "STORE_SPEED", speed(work))
    body = add_vs_repack(zoo, work) + "\n\nSmall files and records per task:\n\n"
    return body + small_files(work)


if __name__ == "__main__":
    zoo_benchmark(__doc__, measure, DOC, "STORE")
