"""The TVQ paper's quantizer in tvq's terms, shared by the benchmarks that compare against it:
one min-max range per tensor, fp32 scales, raw bit-packed codes."""

from __future__ import annotations

PAPER = {"group_size": 0, "range": "minmax", "scale_bits": 0, "codec": "raw"}
PAPER_FLAGS = [arg for k, v in PAPER.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
