"""The archive bytes of the example zoo, pinned: a refactoring must not change them.

A change that means to change the bytes (a new default, a format change) updates the pins and
says so in CHANGELOG.md. (Format 2 changed them: each task's record and config.json joined the
header and payload; every stored tensor of format 1 kept its bytes. Format 3 changed them
again: the header says version 3, and the default codes are `zstd-c`, centered on their
zero-points and coded by zstd's literal stage; the paper setting's stored tensors kept their
bytes.) The zoo is trained on the
CPU, so another platform may train it to other bytes; then there is nothing to compare and the
test skips, saying why.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tvq_cli import PackOptions, pack
from tvq_cli.zoo import Zoo

ZOO_SHA256 = "9441383c9c1fae6cd404ce5e8fb183fcb5119ea8ff8a53642dcc1e4ba7dda63b"
PINS = {
    "defaults": (
        PackOptions(),
        "568a498ee5881cf80654191702dc96e24b4557c56f42df6a37d9ea208f9a1ca7",
    ),
    "paper": (
        PackOptions(bits=2, group_size=0, range="minmax", scale_bits=0, codec="raw"),
        "952a76bc61d1f95f3a4b14cd33f4c697bd342949947824dafa7b977d17685d81",
    ),
}


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("setting", sorted(PINS))
def test_zoo_archive_bytes_are_pinned(zoo: Zoo, tmp_path: Path, setting: str) -> None:
    if _sha256(zoo.pretrained, *zoo.tasks.values()) != ZOO_SHA256:
        pytest.skip("the zoo trained to other bytes on this platform: nothing to compare")
    options, expected = PINS[setting]
    out = tmp_path / f"{setting}.tvq"
    pack(zoo.pretrained.parent, [p.parent for p in zoo.tasks.values()], out, options)
    assert _sha256(out) == expected
