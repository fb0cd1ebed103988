"""Where `tvq pack` spends its time: each stage of the pipeline timed alone, one thread.

Usage (inputs as built by bench_pack.py --inputs DIR, or any pretrained + fine-tuned folders):

    PYTHONPATH=$PWD python benchmarks/profile_pack.py /tmp/tvq-bench/m [--tensors 30]

Runs the stages `pack` overlaps one after the other on the first N tensors, single-threaded,
so their costs add up: reading the raw bf16 tensors (pread), hashing the pretrained ones
(fingerprint), then for TVQ 4-bit the blocked quantizer split into its steps (widen and
subtract, finite check, quantize, bit-pack), and checksumming plus writing the output.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from tvq_cli.checkpoint import Checkpoint, all_finite
from tvq_cli.quant import kernel
from tvq_cli.quant.bitpack import pack_into
from tvq_cli.quant.quantizer import QuantSpec


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", type=Path)
    parser.add_argument("--tensors", type=int, default=30)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    pre = Checkpoint(opts.inputs / "pretrained")
    fts = [Checkpoint(p) for p in sorted(opts.inputs.glob("task*"))]
    names = [n for n in pre.names if len(pre.specs[n].shape) == 2][: opts.tensors]
    spec = QuantSpec(4, 128)
    times = dict.fromkeys(
        [
            "read (pread)",
            "sha256 fingerprint",
            "widen + subtract",
            "finite check",
            "quantize (kernel)",
            "bit-pack",
            "crc32 + write",
        ],
        0.0,
    )
    elements = 0
    block = 1 << 17
    x, work = torch.empty(block), torch.empty(block)
    pre32 = torch.empty(block)
    codes = torch.empty(block, dtype=torch.uint8)
    packed, scratch = np.empty(block // 2, np.uint8), np.empty(block // 8, np.uint64)
    with tempfile.TemporaryFile() as sink:
        for name in names:
            t = time.perf_counter()
            raws = [c.load(name) for c in (pre, *fts)]
            times["read (pread)"] += time.perf_counter() - t
            t = time.perf_counter()
            hashlib.sha256(raws[0].view(torch.uint8).numpy()).digest()
            times["sha256 fingerprint"] += time.perf_counter() - t
            cols = raws[0].shape[-1]
            rows = max(8, block // cols // 8 * 8)
            flat = [r.view(-1, cols) for r in raws]
            for first in range(0, flat[0].shape[0], rows):
                part = [f[first : first + rows] for f in flat]
                n = part[0].numel()
                p = pre32[:n].view(-1, cols)
                p.copy_(part[0])
                for ft in part[1:]:
                    t0 = time.perf_counter()
                    v = x[:n].view(-1, cols)
                    v.copy_(ft)
                    v.sub_(p)
                    t1 = time.perf_counter()
                    all_finite(v)
                    t2 = time.perf_counter()
                    groups = n // 128
                    kernel.quantize_into(
                        x[:n],
                        spec,
                        codes[:n],
                        torch.empty(groups),
                        torch.empty(groups, dtype=torch.uint8),
                        work[:n],
                    )
                    t3 = time.perf_counter()
                    pack_into(codes[:n].numpy(), 4, packed[: n // 2], scratch)
                    t4 = time.perf_counter()
                    zlib.crc32(packed[: n // 2])
                    sink.write(packed[: n // 2])
                    t5 = time.perf_counter()
                    for key, a, b in (
                        ("widen + subtract", t0, t1),
                        ("finite check", t1, t2),
                        ("quantize (kernel)", t2, t3),
                        ("bit-pack", t3, t4),
                        ("crc32 + write", t4, t5),
                    ):
                        times[key] += b - a
                    elements += n
    total = sum(times.values())
    fp32 = elements * 4 * (len(fts) + 1) / len(fts)
    print(f"{len(names)} tensors, {len(fts)} tasks, {elements:,} task elements, one thread")
    print("| stage | seconds | share | GB/s fp32-eq alone |")
    print("|---|---|---|---|")
    for key, sec in times.items():
        print(f"| {key} | {sec:.2f} | {100 * sec / total:.0f}% | {fp32 / sec / 1e9:.2f} |")
    print(f"| total | {total:.2f} | 100% | {fp32 / total / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
