"""Why the low-rate codec codes with rANS: its records against zero-run bytes + zstd on the
same dead-zone codes, and its speed.

For each tensor of each task, one step per rate (a fixed offset from the tensor's RMS, dead
zone 0.5), the codes are stored three ways: a `dzans` record (rANS: static per-tensor table,
row flags, raw sign bits; every byte of it), and two byte layouts compressed with the `zstd-c`
parameters (zstd's literal Huffman stage): zero runs and magnitudes as (run, magnitude) byte
pairs packed into one byte each where they fit (runs < 16, magnitudes < 16; escapes in a second
stream), plus the signs as raw bits and the same side information; and, for scale, the signed
codes as bytes. Prints a markdown table of bits per weight of all tasks and the coders' speed.

Usage: PYTHONPATH=. python benchmarks/lowrate_coder.py [--zoo DIR] [--minilm DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.quant import dzans, entropy, rans

OFFSETS = (12, 8, 6, 4, 2, 0, -4)  # quarter octaves above the RMS: about 0.05 to 3 bits


def task_vectors(pretrained: Path, finetuned: list[Path]) -> list[np.ndarray]:
    base = Checkpoint(pretrained)
    names = [n for n, s in base.specs.items() if s.is_float]
    out = []
    for path in finetuned:
        ft = Checkpoint(path)
        out += [ft.load_float(n).numpy() - base.load_float(n).numpy() for n in names]
    return out


def zstd_bytes(data: np.ndarray) -> int:
    return len(entropy.compress(data.astype(np.uint8).tobytes(), "zstd-c")) if data.size else 0


def runs_layout(k: np.ndarray) -> int:
    """Zero runs and magnitudes, one byte per nonzero code where both fit a nibble (escapes:
    the run's rest in 255-continued bytes, the magnitude's in a byte, in a second stream),
    both streams zstd-c, the signs as raw bits, and a record's side information (9 bytes)."""
    flat = k.reshape(-1)
    nonzero = np.flatnonzero(flat)
    runs = np.diff(np.concatenate([[-1], nonzero])) - 1
    mags = np.abs(flat[nonzero]).astype(np.int64)
    pairs = (np.minimum(runs, 15) << 4) | np.minimum(mags - 1, 15)
    long_runs = runs[runs >= 15] - 15
    extra = np.concatenate([np.full(int((long_runs // 255).sum()), 255), long_runs % 255])
    big = np.minimum(mags[mags >= 16] - 16, 255)
    return zstd_bytes(pairs) + zstd_bytes(np.concatenate([extra, big])) + (mags.size + 7) // 8 + 9


def measure(tensors: list[np.ndarray]) -> list[tuple]:
    weights = sum(x.size for x in tensors)
    rows = []
    for offset in OFFSETS:
        record = runs = plain = 0
        seconds = [0.0, 0.0]
        symbols = 0
        for x in tensors:
            rows_of = 1 if x.ndim < 2 else x.size // x.shape[-1]
            absx = np.abs(x).astype(np.float64)
            rms = math.sqrt(float(np.mean(absx * absx))) if x.size else 0.0
            if rms == 0:
                record, runs, plain = record + 1, runs + 1, plain + 1
                continue
            setting = dzans.Setting(round(4 * math.log2(rms)) + offset)
            start = time.perf_counter()
            coded = dzans.encode(x, rows_of, setting)
            seconds[0] += time.perf_counter() - start
            start = time.perf_counter()
            dzans.decode(dzans.parse(coded.record, 0, rows_of), rows_of, x.size // rows_of)
            seconds[1] += time.perf_counter() - start
            record += len(coded.record)
            symbols += x.size
            k = dzans.magnitudes(absx, setting.step, setting.deadzone)
            if not k.any():
                runs, plain = runs + 1, plain + 1
                continue
            signed = k * np.sign(x).astype(np.int64)
            runs += runs_layout(signed)
            plain += zstd_bytes((np.clip(signed, -127, 127) + 128).astype(np.uint8)) + 9
        bpw = [8 * b / weights for b in (record, runs, plain)]
        speed = [symbols / s / 1e6 for s in seconds]
        rows.append((offset, *bpw, *speed))
    return rows


def table(title: str, rows: list[tuple]) -> str:
    lines = [
        f"#### {title}",
        "",
        "| step (quarter octaves above RMS) | dzans record (rANS), bpw | zero runs + zstd-c | "
        "signed codes as bytes + zstd-c | record encode / decode (M weights/s, whole record) |",
        "|---|---|---|---|---|",
    ]
    for offset, record, runs, plain, enc, dec in rows:
        lines.append(
            f"| {offset:+d} | {record:.4f} | {runs:.4f} ({runs / record - 1:+.0%}) | "
            f"{plain:.4f} ({plain / record - 1:+.0%}) | {enc:.0f} / {dec:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="an example zoo folder (built if missing)")
    parser.add_argument("--minilm", type=Path, help="minilm_fidelity's folder of fine-tunes")
    args = parser.parse_args()
    print(f"rANS: {'C module' if rans.built() else 'numpy reference'}", file=sys.stderr)
    if args.minilm:
        folders = [args.minilm / t for t in ("domain", "kind", "returns", "long")]
        tensors = task_vectors(args.minilm / "pretrained", folders)
        print(table("MiniLM-L6, 4 tasks", measure(tensors)))
    else:
        from tvq_cli.zoo import build_zoo

        zoo = build_zoo(args.zoo or Path("zoo"), seed=0)
        tensors = task_vectors(zoo.pretrained, list(zoo.tasks.values()))
        print(table("example zoo, 8 tasks", measure(tensors)))


if __name__ == "__main__":
    main()
