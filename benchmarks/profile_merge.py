"""Where `tvq merge --method task_arithmetic` spends its time: each stage timed alone, one thread.

Usage (an archive and its pretrained model, e.g. as bench_merge.py leaves them with --inputs):

    PYTHONPATH=$PWD python benchmarks/profile_merge.py /tmp/tvq-bench/m/tasks.tvq \\
        /tmp/tvq-bench/m/pretrained [--tensors 40]

Runs, tensor by tensor, the stages a task-arithmetic merge overlaps, one after the other on one
thread, through the functions the merge calls: reading each task's stored codes (pread and
crc32, into reused buffers), zstd decompression, bit-unpacking, the column blocks (per-group
value tables, the task-order sum, adding the pretrained block and rounding to its dtype),
reading and fingerprinting the pretrained tensor, and writing the merged tensor to a new file.
Each stage is timed in CPU seconds of this thread (`time.thread_time`); writing is timed in
wall seconds too, since a new file's pages are allocated by the kernel. Startup (Python, torch
and tvq imports) is measured in a child process. The sum is a floor for this machine: what the
merge would cost if it did nothing but these stages, with no overhead and no waiting.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from stage_clock import Clock  # benchmarks/ is the script folder

from tvq_cli.archive.format import part_keys
from tvq_cli.archive.reader import Archive
from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.merge.stream import column_blocks
from tvq_cli.quant import entropy, kernel, native, sizes
from tvq_cli.quant.bitpack import unpack_bits


def startup_seconds() -> float:
    """CPU seconds of a child that only imports what `tvq merge` imports."""
    code = "import time, tvq_cli.cli, tvq_cli.merge; print(time.process_time())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("archive", type=Path)
    parser.add_argument("pretrained", type=Path)
    parser.add_argument("--tensors", type=int, default=0, help="first N 2-D tensors (0: all)")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    archive = Archive(opts.archive)
    pre = Checkpoint(opts.pretrained)
    names = [e.name for e in archive.header.tensors if e.kind == "quantized"]
    names = names[: opts.tensors] if opts.tensors else names
    largest = max(pre.specs[n].numel for n in names)
    clock = Clock()
    stored = np.empty(0, np.uint8)
    codes = [np.empty(largest + 8, np.uint8) for _ in archive.tasks]
    read = torch.empty(max(pre.specs[n].nbytes for n in names), dtype=torch.uint8)
    out = torch.empty_like(read)
    weights = torch.ones(len(archive.tasks))
    rows = torch.empty(len(archive.tasks), 1 << 16)
    elements, written, write_wall = 0, 0, 0.0
    with tempfile.NamedTemporaryFile(dir=opts.archive.parent) as sink:
        for name in names:
            entry = archive.entry(name)
            q = []
            for task, buffer in zip(archive.tasks, codes, strict=True):
                part = next(p for p in entry.parts if p.role == archive.scheme.task_role(task))
                key = part_keys(part, name)[0]
                with clock("read stored codes (pread + crc32)"):
                    if stored.size < archive.nbytes(key):
                        stored = np.empty(archive.nbytes(key), np.uint8)
                    frame = archive.raw(key, stored)
                if part.codec in sizes.CODED:
                    size = sizes.symbol_nbytes(entry.numel, part.bits)
                    symbols = entropy._scratch(size)
                    with clock("zstd decompression"):
                        entropy._decompress_into(frame, symbols)
                    width = sizes.SYMBOL_BITS[part.bits]
                else:
                    symbols, width = frame, part.bits
                with clock("bit-unpacking"):
                    unpack_bits(symbols, width, entry.numel, buffer)
                if part.codec == "zstd-c":
                    zeros = archive.quantized(part, entry).zeros.numpy()  # small; not timed
                    with clock("zstd-c: codes uncentered (in place)"):
                        entropy.uncenter(
                            buffer[: entry.numel], zeros, entry.shape, part.group_size, part.bits
                        )
                keys = part_keys(part, name)
                q.append((part, buffer, keys))
            with clock("read + fingerprint the pretrained tensor"):
                raw = pre.load(name, read)
                hashlib.sha256(raw.view(torch.uint8).numpy()).digest()
            decoded = [archive.quantized(p, entry) for p, _, _ in q]  # scales, zeros (small)
            flat, dest = raw.reshape(-1), out[: raw.numel() * raw.element_size()].view(raw.dtype)
            with clock("blocks: value tables, task-order sum, add and round"):
                for s in column_blocks(entry.numel):
                    block = rows[:, : s.stop - s.start]
                    for row, (part, buffer, _), dq in zip(block, q, decoded, strict=True):
                        codes_t = torch.from_numpy(buffer[s])
                        kernel.dequantize_span(
                            codes_t, s.start, part.spec, dq.scales, dq.zeros, row
                        )
                    delta = kernel.weighted_sum(block, weights, 0.3)
                    kernel.add_into(flat[s], delta, dest[s])
            start = time.perf_counter()
            with clock("write the merged tensor (new file)"):
                sink.write(memoryview(dest.view(torch.uint8).numpy()))
            write_wall += time.perf_counter() - start
            elements += entry.numel * len(archive.tasks)
            written += dest.numel() * dest.element_size()
    startup = startup_seconds()
    total = sum(clock.seconds.values()) + startup
    kernels = f"native kernels ({native.lib.simd()})" if native.built() else "torch reference"
    print(f"{len(names)} tensors, {len(archive.tasks)} tasks, {elements:,} task elements, "
          f"{written / 1e9:.2f} GB written; one thread; {kernels}; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| stage | CPU s | share | ns per task element |")
    print("|---|---|---|---|")
    for key, sec in [("startup (imports, child process)", startup), *clock.seconds.items()]:
        print(f"| {key} | {sec:.2f} | {100 * sec / total:.0f}% | {sec / elements * 1e9:.2f} |")
    print(f"| total | {total:.2f} | 100% | {total / elements * 1e9:.2f} |")
    print(f"writing took {write_wall:.2f} s of wall time ({written / write_wall / 1e9:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
