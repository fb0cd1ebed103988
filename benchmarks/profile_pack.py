"""Where `tvq pack` spends its time: each stage of the pipeline timed alone, one thread.

Usage (inputs as built by bench_pack.py --inputs DIR, or any pretrained + fine-tuned folders):

    PYTHONPATH=$PWD python benchmarks/profile_pack.py /tmp/tvq-bench/m [--tensors 30] [--paper]

Runs the stages `pack` overlaps one after the other on the first N weight matrices,
single-threaded, so their costs add up: reading the raw tensors (pread), hashing them (every
input's fingerprint, as pack takes them), then TVQ 4-bit with the default settings (or
`--paper`: one min-max range per tensor, fp32 scale, raw codes) through the functions `pack`
calls, block by block: the
ranges pass (widen, subtract, finite check and every group's range, in one native pass), the
coding pass (widen, subtract, range search, quantization and bit-packing, in one native pass),
zstd (today's entropy stage; skipped with `--paper`), and checksumming plus writing the output.
Each stage is timed in CPU seconds of this thread (`time.thread_time`), so other jobs on a
shared machine slow it down less than they slow wall-clock time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from stage_clock import Clock  # benchmarks/ is the script folder

from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.pack.blocked import BLOCK_ELEMENTS, block_rows
from tvq_cli.quant import entropy, kernel, native, range_search
from tvq_cli.quant.sizes import CODED, DEFAULT_CODEC, SYMBOL_BITS, packed_nbytes
from tvq_cli.quant.spec import QuantSpec


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", type=Path)
    parser.add_argument("--tensors", type=int, default=30)
    parser.add_argument("--paper", action="store_true", help="min-max per tensor, raw codes")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    pre = Checkpoint(opts.inputs / "pretrained")
    fts = [Checkpoint(p) for p in sorted(opts.inputs.glob("task*")) if p.is_dir()]
    names = [n for n in pre.names if len(pre.specs[n].shape) == 2][: opts.tensors]
    if opts.paper:
        spec, codec = QuantSpec(4, 0), "raw"
    else:
        spec, codec = QuantSpec(4, 128, "search", 6), DEFAULT_CODEC
    width = SYMBOL_BITS[4] if codec in CODED else 4
    clock = Clock()
    elements = 0
    scratch = torch.empty(BLOCK_ELEMENTS)
    codes = torch.zeros(BLOCK_ELEMENTS, dtype=torch.uint8)
    one_lo, one_hi = torch.zeros(1), torch.zeros(1)
    with tempfile.TemporaryFile() as sink:
        for name in names:
            with clock("read (pread)"):
                raws = [c.load(name) for c in (pre, *fts)]
            with clock("sha256 fingerprints (every input)"):
                for raw in raws:
                    hashlib.sha256(raw.view(torch.uint8).numpy()).digest()
            cols = raws[0].shape[-1]
            rows = block_rows(cols)
            flat = [r.view(-1, cols) for r in raws]
            starts = range(0, flat[0].shape[0], rows)
            numel = flat[0].numel()
            groups = 1 if spec.group_size == 0 else numel // spec.group_size
            for ft in flat[1:]:
                lo, hi = torch.zeros(groups), torch.zeros(groups)
                with clock("ranges pass (widen, subtract, ranges)"):
                    for first in starts:
                        block, minus = ft[first : first + rows], flat[0][first : first + rows]
                        n = block.numel()
                        if spec.group_size:
                            g = slice(first * cols // 128, (first * cols + n) // 128)
                            kernel.ranges_into(block, minus, 128, lo[g], hi[g], scratch)
                        else:
                            kernel.ranges_into(block, minus, n, one_lo, one_hi, scratch)
                            torch.minimum(lo, one_lo, out=lo)
                            torch.maximum(hi, one_hi, out=hi)
                    fallback, top = range_search.grid_top(lo, hi, spec)
                    coder = kernel.BlockCoder(spec, fallback, top, width, codec == "zstd-c")
                out = np.empty(packed_nbytes(numel, width), np.uint8)
                scales = torch.empty(groups)
                zeros = torch.empty(groups, dtype=torch.uint8)
                steps = torch.empty(groups, dtype=torch.uint8) if spec.scale_bits else None
                with clock("coding pass (widen, subtract, search, quantize, pack)"):
                    for first in starts:
                        block, minus = ft[first : first + rows], flat[0][first : first + rows]
                        n = block.numel()
                        g = slice(0, 1)
                        if spec.group_size:
                            g = slice(first * cols // 128, (first * cols + n) // 128)
                        start = first * cols * width // 8
                        coder.encode(
                            block,
                            minus,
                            spec.group_size or n,
                            lo[g],
                            hi[g],
                            True,
                            scratch,
                            codes,
                            out[start : start + packed_nbytes(n, width)],
                            scales[g],
                            zeros[g],
                            None if steps is None else steps[g],
                        )
                if codec in CODED:
                    with clock(f"zstd ({codec})"):
                        data = entropy.compress(out, codec)
                else:
                    data = out
                with clock("crc32 + write"):
                    zlib.crc32(data)
                    sink.write(data)
                elements += numel
            with clock("free the inputs"):
                del raws, flat
    total = sum(clock.seconds.values())
    fp32 = elements * 4 * (len(fts) + 1) / len(fts)
    route = "paper settings" if opts.paper else "defaults"
    kernels = f"native kernels ({native.lib.simd()})" if native.built() else "torch reference"
    print(f"{len(names)} tensors, {len(fts)} tasks, {elements:,} task elements, one thread")
    print(f"TVQ 4-bit, {route}, {kernels}; load average {os.getloadavg()[0]:.1f}")
    print("| stage | CPU s | share | ns per task element | GB/s fp32-eq alone |")
    print("|---|---|---|---|---|")
    for key, sec in clock.seconds.items():
        print(
            f"| {key} | {sec:.2f} | {100 * sec / total:.0f}% | {sec / elements * 1e9:.2f} "
            f"| {fp32 / sec / 1e9:.2f} |"
        )
    print(
        f"| total | {total:.2f} | 100% | {total / elements * 1e9:.2f} | {fp32 / total / 1e9:.2f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
