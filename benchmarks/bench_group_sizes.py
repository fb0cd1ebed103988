"""Time `tvq pack` and `tvq merge` at unusual group sizes against the default, in one run.

Usage (from the repository root; about a minute on 2 shared cores):

    PYTHONPATH=$PWD python benchmarks/bench_group_sizes.py [--threads N] [--repeats R]

A Llama-shaped model of 2.48M parameters (hidden 256, MLP 688, 2 layers, vocabulary 2000: rows
of 256 and 688 elements), written once with two fine-tunes (random fp32 weights, small random
deltas). For each group size (128: the default; 256: a row; 3 and 100: groups that leave a
short last group in every row; 100000: longer than any row) it packs the fine-tunes (default
settings otherwise) and merges the archive with TIES, in this process, the best of R runs
each, and prints the seconds and the ratio to groups of 128 measured in the same run.
Before rows were split into whole groups and one short tail, a row was padded to the group
size: 100000 ran for more than 18 minutes and 1 GB, and 3 ran the search's torch reference.
Results: docs/performance.md ("Group sizes").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import tvq_cli
from tvq_cli.merge import MergeRequest, merge
from tvq_cli.pack import PackOptions

GROUPS = (128, 256, 100, 3, 100_000)
HIDDEN, MLP, VOCAB, LAYERS = 256, 688, 2000, 2


def build(root: Path) -> tuple[Path, list[Path]]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (HIDDEN // 2, HIDDEN),
            p + "self_attn.v_proj.weight": (HIDDEN // 2, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (MLP, HIDDEN),
            p + "mlp.up_proj.weight": (MLP, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, MLP),
            p + "input_layernorm.weight": (HIDDEN,),
        }
    pre = {name: torch.randn(shape, generator=gen) * 0.05 for name, shape in shapes.items()}
    save_file(pre, str(root / "pre.safetensors"))
    fts = []
    for t in range(2):
        tuned = {k: v + 0.001 * torch.randn(v.shape, generator=gen) for k, v in pre.items()}
        save_file(tuned, str(root / f"ft{t}.safetensors"))
        fts.append(root / f"ft{t}.safetensors")
    print(f"model: {sum(v.numel() for v in pre.values()):,} parameters, 2 fine-tunes")
    return root / "pre.safetensors", fts


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pre, fts = build(root)
        rows = []
        for group in GROUPS:
            archive = root / f"g{group}.tvq"
            options = PackOptions(group_size=group)

            def pack(archive=archive, options=options) -> None:
                tvq_cli.pack(pre, fts, archive, options, overwrite=True, threads=args.threads)

            def merge_it(archive=archive) -> None:
                request = MergeRequest(
                    [archive], pre, root / "m.safetensors", "ties", force=True, threads=args.threads
                )
                merge(request)

            rows.append((group, best_of(args.repeats, pack), best_of(args.repeats, merge_it)))
        base_pack, base_merge = rows[0][1], rows[0][2]
        print("| group size | pack s | pack / G=128 | merge s | merge / G=128 |")
        print("| --- | --- | --- | --- | --- |")
        for group, pack_s, merge_s in rows:
            print(
                f"| {group} | {pack_s:.2f} | {pack_s / base_pack:.2f} | {merge_s:.2f} "
                f"| {merge_s / base_merge:.2f} |"
            )


if __name__ == "__main__":
    main()
