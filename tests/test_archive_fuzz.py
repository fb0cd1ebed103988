"""Fuzzing the reader: mutated archives may only raise TvqError, or read back the exact numbers
of the intact archive; forged headers (valid checksum, random content) may only raise TvqError.
Bounded for CI: a fixed number of examples, no deadline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import make_checkpoints
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_archive_damage import read_everything, reencode

import tvq_cli
from tvq_cli.errors import TvqError
from tvq_cli.pack import PackOptions

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module", params=["dense", "low-rate"])
def intact(request, tmp_path_factory) -> tuple[bytes, dict[str, np.ndarray], Path]:
    root = tmp_path_factory.mktemp("fuzz")
    pre, fts = make_checkpoints(root, n_tasks=2)
    out = root / "a.tvq"
    budget = 3.0 if request.param == "low-rate" else None  # records in frames
    tvq_cli.pack(pre, fts, out, PackOptions(scheme="rtvq", group_size=16, budget=budget), threads=1)
    return out.read_bytes(), read_everything(out), root


def _check(data: bytes, root: Path, expected: dict[str, np.ndarray] | None) -> None:
    path = root / "mutant.tvq"
    path.write_bytes(data)
    try:
        values = read_everything(path)
    except TvqError:
        return
    if expected is not None:  # damage that went unnoticed must not change a single number
        assert values.keys() == expected.keys()
        for key, value in expected.items():
            assert np.array_equal(values[key], value, equal_nan=True), key


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10**9)),
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=4),
    ),
    st.tuples(st.just("overwrite"), st.integers(0, 10**9), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), st.integers(0, 10**9), st.binary(min_size=1, max_size=8)),
)


@FUZZ
@given(mutation=mutation, in_header=st.booleans())
def test_mutated_archive(intact, mutation, in_header) -> None:
    data, expected, root = intact
    span = int.from_bytes(data[:8], "little") + 8 if in_header else len(data)
    kind, *args = mutation
    out = bytearray(data)
    if kind == "truncate":
        out = out[: args[0] % len(data)]
    elif kind == "flip":
        for pos, bit in args[0]:
            out[pos % span] ^= 1 << bit
    elif kind == "overwrite":
        pos = args[0] % span
        out[pos : pos + len(args[1])] = args[1]
        out = out[: len(data)]
    else:
        pos = args[0] % span
        out[pos:pos] = args[1]
    _check(bytes(out), root, expected if bytes(out) != data else None)


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(path=st.lists(st.integers(0, 50), min_size=1, max_size=5), value=json_value)
def test_forged_header(intact, path, value) -> None:
    """Replace one node of the tvq header (walking `path` down) with a random JSON value."""
    data, _, root = intact

    def edit(node):
        for step in path[:-1]:
            children = list(node.values()) if isinstance(node, dict) else node
            if not isinstance(children, list) or not children:
                break
            child = children[step % len(children)]
            if not isinstance(child, dict | list):
                break
            node = child
        if isinstance(node, dict) and node:
            node[sorted(node)[path[-1] % len(node)]] = value
        elif isinstance(node, list) and node:
            node[path[-1] % len(node)] = value

    try:
        forged = reencode(data, edit)
    except ValueError:  # a float the JSON encoder refuses (never reaches the reader)
        return
    _check(forged, root, None)


def test_forged_header_json_is_valid_json(intact) -> None:
    data, _, _ = intact
    doc = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert json.loads(doc["__metadata__"]["tvq"])["format"] == "tvq-archive"
