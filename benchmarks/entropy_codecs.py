"""The dense codes' entropy stage: format 2's `zstd` against `zstd-c` (codes centered on their
zero-points, zstd's literal stage alone), in size and speed, on the same codes.

Codes are tvq's defaults' (groups of 128, range search, 6-bit scales) of two kinds of task
vectors: the example zoo's (fp32 fine-tunes: continuous deltas) and bench_pack.py's bf16
fine-tunes (a heavy-tailed delta of about 1e-3 of the weights rounded into bf16: most entries
exactly zero, the rest one or two bf16 steps), at 2, 3 and 4 bits. Sizes: bits per code of the
stored frame. Speed: million codes per CPU-second of one thread (thread time, best of 5; the
shared machine's load barely moves it); encode includes centering, decode its undoing.
Writes docs/performance.md between the ENTROPY markers.

Usage: PYTHONPATH=. python benchmarks/entropy_codecs.py [--zoo DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tvq_cli.archive.format import Part
from tvq_cli.archive.parts import stored_codes
from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.quant import entropy
from tvq_cli.quant.quantizer import quantize
from tvq_cli.quant.spec import QuantSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pack import tensor_value  # noqa: E402
from doc_sections import write_section  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def zoo_vectors(root: Path) -> torch.Tensor:
    from tvq_cli.zoo import build_zoo

    zoo = build_zoo(root, seed=0)
    pre = Checkpoint(zoo.pretrained)
    names = [n for n, s in pre.specs.items() if len(s.shape) == 2 and s.shape[-1] % 128 == 0]
    rows = [
        (Checkpoint(ft).load_float(n) - pre.load_float(n)).reshape(-1, 128)
        for ft in zoo.tasks.values()
        for n in names
    ]
    return torch.cat(rows)


def bf16_vectors() -> torch.Tensor:
    shape = (2048, 2048)
    pre = tensor_value("layers.0.mlp.up_proj.weight", shape, 0).float()
    return torch.cat(
        [tensor_value("layers.0.mlp.up_proj.weight", shape, t).float() - pre for t in (1, 2)]
    )


def cpu_seconds(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def measure(x: torch.Tensor) -> list[tuple]:
    rows = []
    shape = tuple(x.shape)
    for bits in (2, 3, 4):
        q = quantize(x, QuantSpec(bits, 128, "search", 6))
        zeros = q.zeros.numpy()
        row = [bits]
        for codec in ("zstd", "zstd-c"):
            part = Part("task:t", bits, 128, codec=codec)
            frame = stored_codes(part, shape, q)

            def decode(frame=frame, codec=codec, bits=bits, zeros=zeros) -> None:
                codes = entropy.decode(frame, bits, x.numel())
                if codec == "zstd-c":
                    entropy.center(codes, zeros, shape, 128, bits, undo=True)

            encode = cpu_seconds(lambda part=part, q=q: stored_codes(part, shape, q))
            row += [8 * len(frame) / x.numel(), x.numel() / encode / 1e6]
            row.append(x.numel() / cpu_seconds(decode) / 1e6)
        rows.append(tuple(row))
    return rows


def table(rows_by_data: dict[str, list[tuple]]) -> str:
    lines = [
        "| codes | bits | zstd: bits/code | encode | decode "
        "| zstd-c: bits/code | encode | decode |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for data, rows in rows_by_data.items():
        for bits, size, enc, dec, size_c, enc_c, dec_c in rows:
            lines.append(
                f"| {data} | {bits} | {size:.3f} | {enc:.0f} | {dec:.0f} | "
                f"{size_c:.3f} ({size_c / size - 1:+.0%}) | {enc_c:.0f} ({enc_c / enc:.1f}x) | "
                f"{dec_c:.0f} ({dec_c / dec:.1f}x) |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo"), help="example zoo (built)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = {
        "zoo (fp32 fine-tunes)": zoo_vectors(args.zoo),
        "bf16 fine-tunes (bench_pack)": bf16_vectors(),
    }
    text = table({name: measure(x) for name, x in data.items()})
    write_section(DOC, "ENTROPY", text)
    print(text)


if __name__ == "__main__":
    main()
