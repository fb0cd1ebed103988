"""Benchmarks write their tables into docs between HTML comment markers, so reruns replace
their own section and leave the surrounding prose alone."""

from __future__ import annotations

import re
from pathlib import Path


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
