"""Benchmarks write their tables into docs between HTML comment markers, so reruns replace
their own section and leave the surrounding prose alone."""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from tvq_cli.zoo import Zoo, build_zoo


def write_section(doc: Path, marker: str, body: str) -> None:
    """Replace the text between `<!-- MARKER -->` and `<!-- /MARKER -->` in `doc` (appended,
    with the markers, when the doc or the markers are missing)."""
    text = doc.read_text() if doc.exists() else ""
    block = f"<!-- {marker} -->\n{body}\n<!-- /{marker} -->"
    pattern = rf"<!-- {re.escape(marker)} -->.*<!-- /{re.escape(marker)} -->"
    if re.search(pattern, text, flags=re.S):
        text = re.sub(pattern, lambda _: block, text, flags=re.S)
    else:
        text += f"\n{block}\n"
    doc.write_text(text)


def marked_sections(text: str) -> dict[str, str]:
    """Every `<!-- MARKER -->` ... `<!-- /MARKER -->` section of a doc, by marker."""
    found = re.finditer(r"<!-- ([A-Za-z0-9_-]+) -->\n(.*?)\n<!-- /\1 -->", text, flags=re.S)
    return {m.group(1): m.group(2) for m in found}


def zoo_benchmark(description: str, run: Callable[[Zoo, Path], str], doc: Path, marker: str):
    """A benchmark's command line on the example zoo: `--zoo DIR` (built if missing), torch
    on one thread, a temporary work folder; `run`'s text goes between `marker`s of `doc`."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="an example zoo folder (built if missing)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        body = run(build_zoo(args.zoo or work / "zoo", seed=0), work)
    write_section(doc, marker, body)
    print(body)
