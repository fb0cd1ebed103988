"""Where `tvq pack` spends its time: each stage of the pipeline timed alone, one thread.

Usage (inputs as built by bench_pack.py --inputs DIR, or any pretrained + fine-tuned folders):

    PYTHONPATH=$PWD python benchmarks/profile_pack.py /tmp/tvq-bench/m [--tensors 30] [--paper]

Runs the stages `pack` overlaps one after the other on the first N weight matrices,
single-threaded, so their costs add up: reading the raw tensors (pread), hashing the pretrained
ones (fingerprint), then TVQ 4-bit with the default settings (or `--paper`: one min-max range
per tensor, fp32 scale, raw codes) through the functions `pack` calls, block by block: widening
and subtracting (with the finite check), the ranges pass, the search and quantization, bit
packing, zstd, and checksumming plus writing the output.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.pack.blocked import BLOCK_ELEMENTS, block_rows
from tvq_cli.quant import entropy, kernel, native, range_search
from tvq_cli.quant.bitpack import pack_into, packed_nbytes
from tvq_cli.quant.spec import QuantSpec


class Clock:
    """Adds the time of each `with clock("stage"):` block to that stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stage = ""

    def __call__(self, stage: str) -> Clock:
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self._stage] += time.perf_counter() - self._start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", type=Path)
    parser.add_argument("--tensors", type=int, default=30)
    parser.add_argument("--paper", action="store_true", help="min-max per tensor, raw codes")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    pre = Checkpoint(opts.inputs / "pretrained")
    fts = [Checkpoint(p) for p in sorted(opts.inputs.glob("task*"))]
    names = [n for n in pre.names if len(pre.specs[n].shape) == 2][: opts.tensors]
    if opts.paper:
        spec, codec = QuantSpec(4, 0), "raw"
    else:
        spec, codec = QuantSpec(4, 128, "search", 6), entropy.DEFAULT_CODEC
    width = entropy.SYMBOL_BITS[4] if codec in entropy.CODED else 4
    clock = Clock()
    elements = 0
    x, pre32 = torch.empty(BLOCK_ELEMENTS), torch.empty(BLOCK_ELEMENTS)
    codes = np.zeros(BLOCK_ELEMENTS, np.uint8)
    scratch = np.empty(BLOCK_ELEMENTS // 8, np.uint64)
    with tempfile.TemporaryFile() as sink:
        for name in names:
            with clock("read (pread)"):
                raws = [c.load(name) for c in (pre, *fts)]
            with clock("sha256 fingerprint"):
                hashlib.sha256(raws[0].view(torch.uint8).numpy()).digest()
            cols = raws[0].shape[-1]
            rows = block_rows(cols)
            flat = [r.view(-1, cols) for r in raws]
            starts = range(0, flat[0].shape[0], rows)
            numel = flat[0].numel()
            for ft in flat[1:]:
                groups = 1 if spec.group_size == 0 else numel // spec.group_size
                lo, hi = torch.zeros(groups), torch.zeros(groups)
                for first in starts:  # pass 1: every group's range
                    n = flat[0][first : first + rows].numel()
                    with clock("widen + subtract + finite check"):
                        kernel.widen_into(flat[0][first : first + rows], pre32[:n])
                        kernel.widen_into(ft[first : first + rows], x[:n], pre32[:n])
                    with clock("ranges"):
                        if spec.group_size:
                            g = slice(first * cols // 128, (first * cols + n) // 128)
                            lo[g], hi[g] = range_search.group_ranges(x[:n].view(-1, 128))
                        else:
                            a, b = range_search.group_ranges(x[:n].view(1, -1))
                            lo, hi = torch.minimum(lo, a), torch.maximum(hi, b)
                fallback, top = range_search.grid_top(lo, hi, spec)
                out = np.empty(packed_nbytes(numel, width), np.uint8)
                for first in starts:  # pass 2: search, quantize, pack
                    n = flat[0][first : first + rows].numel()
                    with clock("widen + subtract + finite check"):
                        kernel.widen_into(flat[0][first : first + rows], pre32[:n])
                        kernel.widen_into(ft[first : first + rows], x[:n], pre32[:n])
                    with clock("search + quantize"):
                        g = slice(0, 1)
                        if spec.group_size:
                            g = slice(first * cols // 128, (first * cols + n) // 128)
                        grouped = x[:n].view(-1, spec.group_size or n)
                        q = range_search.quantize_groups(grouped, lo[g], hi[g], spec, fallback, top)
                    if codec == "zstd-c":
                        with clock("center codes on zero-points"):
                            zeros = q.zeros.numpy()
                            centered = entropy.center(
                                q.codes.numpy(), zeros, (n // cols, cols), spec.group_size, 4
                            )
                            q.codes.view(-1).copy_(torch.from_numpy(centered))
                    with clock("bit-pack"):
                        codes[:n] = q.codes.view(-1).numpy()
                        start = first * cols * width // 8
                        size = packed_nbytes(n, width)
                        pack_into(codes[:n], width, out[start : start + size], scratch)
                if codec in entropy.CODED:
                    with clock(f"zstd ({codec})"):
                        data = entropy.compress(out, codec)
                else:
                    data = out
                with clock("crc32 + write"):
                    zlib.crc32(data)
                    sink.write(data)
                elements += numel
    total = sum(clock.seconds.values())
    fp32 = elements * 4 * (len(fts) + 1) / len(fts)
    route = "paper settings" if opts.paper else "defaults"
    kernels = "native kernels" if native.built() else "torch reference (no native build)"
    print(f"{len(names)} tensors, {len(fts)} tasks, {elements:,} task elements, one thread")
    print(f"TVQ 4-bit, {route}, {kernels}")
    print("| stage | seconds | share | GB/s fp32-eq alone |")
    print("|---|---|---|---|")
    for key, sec in clock.seconds.items():
        print(f"| {key} | {sec:.2f} | {100 * sec / total:.0f}% | {fp32 / sec / 1e9:.2f} |")
    print(f"| total | {total:.2f} | 100% | {fp32 / total / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
