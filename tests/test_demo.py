"""`tvq demo`: runs end to end, every printed step is a real command, and its table parses."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from helpers import run_cli

from tvq_cli.demo import SCHEMES, TABLE_HEADER
from tvq_cli.zoo import Zoo


def parse_table(out: str) -> list[list[str]]:
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


@pytest.fixture(scope="module")
def demo(zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("demo") / "tvq-demo"
    root.mkdir()
    (root / "zoo").symlink_to(zoo.root)  # reuse the session's zoo, as the demo reuses a built one
    code, out, err = run_cli("demo", "--dir", root)
    assert code == 0, err
    return root, out


def test_demo_table(demo: tuple[Path, str]) -> None:
    _, out = demo
    table = parse_table(out)
    assert tuple(table[0]) == TABLE_HEADER and set(table[1]) == {"---"}
    rows = {row[0]: row for row in table[2:]}
    assert list(rows) == [label for label, _, _ in SCHEMES]
    bpw = {label: float(row[1]) for label, row in rows.items()}
    assert bpw["fp32 (exact)"] > 32 > bpw["TVQ 4-bit"] > bpw["RTVQ B3O2"] > bpw["TVQ 2-bit"]
    fp32 = rows["fp32 (exact)"]
    assert fp32[5:] == ["+0.00", "+0.00"]
    for label, row in rows.items():
        ta, ties, d_ta, d_ties = (float(x) for x in row[3:])
        assert d_ta == pytest.approx(ta - float(fp32[3]), abs=0.011)
        assert d_ties == pytest.approx(ties - float(fp32[4]), abs=0.011)
        assert abs(d_ta) < 2.0 and abs(d_ties) < 2.0, label  # quantized merges stay close
    assert abs(float(rows["TVQ 4-bit"][5])) < 0.5
    assert float(fp32[3]) > 85.0  # the fp32 merge is well above the pretrained backbone (~83)


def test_demo_prints_real_commands(demo: tuple[Path, str]) -> None:
    root, out = demo
    commands = [shlex.split(line[6:]) for line in out.splitlines() if line.startswith("$ tvq ")]
    verbs = [c[0] if c[0] != "zoo" else " ".join(c[:2]) for c in commands]
    assert verbs[0] == "zoo build" and verbs.count("pack") == len(SCHEMES)
    assert verbs.count("merge") == verbs.count("zoo eval") == 2 * len(SCHEMES)
    assert "inspect" in verbs and "bits per weight" in out
    for _, name, _ in SCHEMES:
        assert (root / name).is_file()
    # A printed step typed back in does what the demo did.
    last_eval = commands[verbs.index("zoo eval")]
    code, again, _ = run_cli(*last_eval)
    assert code == 0 and '"mean"' in again


def test_demo_refuses_a_file_as_its_folder(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    code, out, err = run_cli("demo", "--dir", target)
    assert code == 1 and out == "" and "not a folder" in err and err.count("\n") == 1
