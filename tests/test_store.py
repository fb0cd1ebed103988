"""The archive as a store: tasks added and removed in place, sharded archives, version 1
archives, task names, and each fine-tune back out (`extract`, `task_tensors`)."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import finetune, run_cli, synthetic_model, write_checkpoint
from safetensors.torch import load_file

import tvq_cli
from tvq_cli import PackOptions, TvqError
from tvq_cli.archive.format import FORMAT_VERSION
from tvq_cli.io.target import claim_output
from tvq_cli.merge import MergeRequest, merge

DATA = Path(__file__).parent / "data"


@pytest.fixture
def zoo(tmp_path) -> tuple[Path, list[Path]]:
    """A pretrained folder and four fine-tune folders (each with a config.json)."""
    pre = synthetic_model()
    base = write_checkpoint(tmp_path / "pre", pre, folder=True)
    return base, [
        write_checkpoint(tmp_path / f"t{i}", finetune(pre, i), folder=True) for i in range(4)
    ]


def task_vectors(path: Path) -> dict[tuple[str, str], torch.Tensor]:
    archive = tvq_cli.open_archive(path)
    pre = synthetic_model()
    return {
        (task, entry.name): archive.task_vector(task, entry.name, pre[entry.name].float())
        for task in archive.tasks
        for entry in archive.header.tensors
        if entry.kind != "shared"
    }


@pytest.mark.parametrize("scheme", ["tvq", "fq"])
def test_add_gives_the_archive_packing_all_tasks_gives(zoo, tmp_path, scheme):
    base, fts = zoo
    options = PackOptions(scheme=scheme)
    tvq_cli.pack(base, fts, tmp_path / "all.tvq", options)
    tvq_cli.pack(base, fts[:2], tmp_path / "grown.tvq", options)
    result = tvq_cli.add_tasks(tmp_path / "grown.tvq", base, fts[2:])
    assert result.header.tasks == ["t0", "t1", "t2", "t3"]
    assert (tmp_path / "grown.tvq").read_bytes() == (tmp_path / "all.tvq").read_bytes()


def test_rtvq_add_keeps_the_base_and_the_old_tasks(zoo, tmp_path):
    base, fts = zoo
    out = tmp_path / "r.tvq"
    tvq_cli.pack(base, fts[:3], out, PackOptions(scheme="rtvq"))
    before = task_vectors(out)
    tvq_cli.add_tasks(out, base, fts[3:])
    after = task_vectors(out)
    for key, tau in before.items():
        assert torch.equal(after[key], tau), key
    archive = tvq_cli.open_archive(out)
    pre, ft = synthetic_model(), load_file(str(fts[3] / "model.safetensors"))
    entry = archive.entry("layers.0.fc.weight")
    parts = {p.role: p for p in entry.parts}
    offset = archive.dequantized(parts["offset:t3"], entry)
    assert torch.equal(
        after[("t3", entry.name)], archive.dequantized(parts["base"], entry) + offset
    )
    tau = ft[entry.name] - pre[entry.name]
    assert (after[("t3", entry.name)] - tau).norm() / tau.norm() < 0.5


def test_remove_keeps_every_other_byte(zoo, tmp_path):
    base, fts = zoo
    tvq_cli.pack(base, fts, tmp_path / "a.tvq")
    tvq_cli.pack(base, [fts[0], fts[2], fts[3]], tmp_path / "b.tvq")
    header = tvq_cli.remove_tasks(tmp_path / "a.tvq", ["t1"])
    assert header.tasks == ["t0", "t2", "t3"]
    assert (tmp_path / "a.tvq").read_bytes() == (tmp_path / "b.tvq").read_bytes()
    before = (tmp_path / "a.tvq").read_bytes()
    with pytest.raises(TvqError, match="has no task 'zz'"):
        tvq_cli.remove_tasks(tmp_path / "a.tvq", ["zz"])
    with pytest.raises(TvqError, match="would leave no task"):
        tvq_cli.remove_tasks(tmp_path / "a.tvq", ["t0", "t2", "t3"])
    assert (tmp_path / "a.tvq").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_rtvq_remove_leaves_the_others_decoding_as_before(zoo, tmp_path):
    base, fts = zoo
    out = tmp_path / "r.tvq"
    tvq_cli.pack(base, fts, out, PackOptions(scheme="rtvq"))
    before = task_vectors(out)
    tvq_cli.remove_tasks(out, ["t0"])
    after = task_vectors(out)
    assert {task for task, _ in after} == {"t1", "t2", "t3"}
    assert all(torch.equal(tau, before[key]) for key, tau in after.items())


def test_add_refuses_clashes_and_the_wrong_base(zoo, tmp_path):
    base, fts = zoo
    out = tmp_path / "a.tvq"
    tvq_cli.pack(base, fts[:2], out)
    before = out.read_bytes()
    with pytest.raises(TvqError, match="already holds a task 't1'"):
        tvq_cli.add_tasks(out, base, [fts[1]])
    other = write_checkpoint(tmp_path / "other", synthetic_model(seed=7), folder=True)
    with pytest.raises(TvqError, match="not the pretrained checkpoint"):
        tvq_cli.add_tasks(out, other, [fts[2]])
    with pytest.raises(TvqError, match="is one file; --max-shard-size"):
        tvq_cli.add_tasks(out, base, [fts[2]], max_shard_size="1KB")
    assert out.read_bytes() == before
    with claim_output(out, True, []), pytest.raises(TvqError, match="another tvq process"):
        tvq_cli.add_tasks(out, base, [fts[2]])
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def shard_payloads(folder: Path) -> list[int]:
    sizes = []
    for shard in sorted(folder.glob("*-of-*.tvq")):
        data = shard.read_bytes()
        sizes.append(len(data) - 8 - int.from_bytes(data[:8], "little"))
    return sizes


def test_sharded_archive_holds_the_same_tensors_and_works_everywhere(zoo, tmp_path):
    base, fts = zoo
    single, folder = tmp_path / "one.tvq", tmp_path / "store"
    tvq_cli.pack(base, fts[:3], single)
    result = tvq_cli.pack(base, fts[:3], folder, max_shard_size="4KB")
    names = sorted(p.name for p in folder.iterdir() if p.name != ".tvq-output.json")
    count = len(names) - 1
    assert count > 2 and names[-1] == "store.tvq.index.json"
    assert names[:-1] == [f"store-{i:05d}-of-{count:05d}.tvq" for i in range(1, count + 1)]
    assert max(shard_payloads(folder)) <= 4000 or count == len(result.header.tensors)
    with pytest.raises(TvqError, match="is a file, and the output is a folder"):
        tvq_cli.pack(base, fts[:1], single, max_shard_size="4KB", overwrite=True)
    one, sharded = tvq_cli.open_archive(single), tvq_cli.open_archive(folder)
    archive_files = [p for p in folder.iterdir() if p.name != ".tvq-output.json"]  # tvq's manifest
    assert sharded.sharded and sharded.file_size == sum(p.stat().st_size for p in archive_files)
    for stored in one.stored:
        assert np.array_equal(one.raw(stored.key), sharded.raw(stored.key))
    index = folder / "store.tvq.index.json"
    for path in (folder, index):
        code, out, err = run_cli("inspect", path, "--verify", "--json")
        assert code == 0, err
        assert json.loads(out)["bytes"]["total"] == sharded.file_size
    merged = merge(MergeRequest([folder], base, tmp_path / "m.safetensors", "average"))
    reference = merge(MergeRequest([single], base, tmp_path / "r.safetensors", "average"))
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "r.safetensors").read_bytes()
    assert merged["tasks"] == reference["tasks"]
    tvq_cli.add_tasks(folder, base, fts[3:])
    tvq_cli.remove_tasks(index, ["t0"])
    assert tvq_cli.open_archive(folder).tasks == ["t1", "t2", "t3"]
    assert all(p.name.startswith(("store", ".tvq-output")) for p in folder.iterdir())
    assert max(shard_payloads(folder)) <= 4000 or len(shard_payloads(folder)) > 1
    tvq_cli.add_tasks(folder, base, [fts[0]], max_shard_size="1MB")
    assert len(shard_payloads(folder)) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_damaged_or_mixed_shards_are_refused(zoo, tmp_path):
    base, fts = zoo
    a, b = tmp_path / "a", tmp_path / "b"
    tvq_cli.pack(base, fts[:2], a, max_shard_size="4KB")
    tvq_cli.pack(base, fts[1:3], b, max_shard_size="4KB")
    shards = sorted(a.glob("*-of-*.tvq"))
    other = sorted(b.glob("*-of-*.tvq"))
    swapped = tmp_path / "swapped"
    shutil.copytree(a, swapped)
    shutil.copy(other[1], swapped / shards[1].name)
    with pytest.raises(TvqError, match="is not shard 2 of"):
        tvq_cli.open_archive(swapped)
    (swapped / shards[1].name).unlink()
    with pytest.raises(TvqError, match="no such file"):
        tvq_cli.open_archive(swapped)
    index = a / "a.tvq.index.json"
    text = index.read_text()
    index.write_text(text.replace('"t0', '"x0', 1))
    with pytest.raises(TvqError, match="checksum mismatch|malformed"):
        tvq_cli.open_archive(a)
    with pytest.raises(TvqError, match="not an archive"):
        tvq_cli.open_archive(tmp_path)


@pytest.mark.parametrize("name", ["v1-tvq", "v1-rtvq"])
def test_version_1_archives_still_work(tmp_path, name):
    """Archives written by tvq before format 2 (tests/data, packed from helpers' model and
    fine-tunes 0 and 1) read, merge, extract and grow; growing writes format 2."""
    pre = synthetic_model()
    base = write_checkpoint(tmp_path / "pre.safetensors", pre)
    fts = [write_checkpoint(tmp_path / f"task{i}.safetensors", finetune(pre, i)) for i in range(3)]
    archive = tmp_path / "a.tvq"
    shutil.copy(DATA / f"{name}.tvq", archive)
    report = tvq_cli.inspect_archive(archive, against=(base, fts[:2]), verify=True)
    assert report["format_version"] == 1 and [t["name"] for t in report["tasks"]] == [
        "task0",
        "task1",
    ]
    assert all(t["rel_l2"] < 0.5 and t["fingerprint"] is None for t in report["tasks"])
    before = task_vectors(archive)
    out = tmp_path / "x.safetensors"
    extracted = tvq_cli.extract(archive, "task1", base, out, against=fts[1])
    assert extracted["against"]["fingerprint"] == "not recorded"
    weights = load_file(str(out))
    assert weights.keys() == pre.keys()
    assert torch.equal(weights["position_ids"], pre["position_ids"])
    tvq_cli.add_tasks(archive, base, fts[2:])
    assert tvq_cli.open_archive(archive).header.version == FORMAT_VERSION
    after = task_vectors(archive)
    assert all(torch.equal(after[key], tau) for key, tau in before.items())


def test_task_names_from_any_folder(tmp_path):
    pre = synthetic_model()
    base = write_checkpoint(tmp_path / "pre", pre, folder=True)
    spaced = write_checkpoint(tmp_path / "my task (v2)", finetune(pre, 0), folder=True)
    nfd = unicodedata.normalize("NFD", "modèle")
    accented = write_checkpoint(tmp_path / nfd, finetune(pre, 1), folder=True)
    odd = write_checkpoint(tmp_path / "()", finetune(pre, 2), folder=True)
    out = tmp_path / "a.tvq"
    code, _, err = run_cli("pack", "--pretrained", base, spaced, accented, "--out", out)
    assert code == 0, err
    assert tvq_cli.open_archive(out).tasks == ["my_task_v2", "modèle"]
    assert "task name 'my_task_v2' (from 'my task (v2)'" in err
    code, _, err = run_cli("pack", "--pretrained", base, odd, "--out", tmp_path / "b.tvq")
    assert code == 2 and f"give one with --name NAME={odd}" in err
    code, _, err = run_cli(
        "pack",
        "--pretrained",
        base,
        odd,
        "--name",
        f"日本語タスク={odd}",
        "--out",
        tmp_path / "b.tvq",
    )
    assert code == 0, err
    assert tvq_cli.open_archive(tmp_path / "b.tvq").tasks == ["日本語タスク"]
    code, _, err = run_cli("extract", tmp_path / "b.tvq", "--task", "日本語タスク",
                           "--pretrained", base, "--out", tmp_path / "x")  # fmt: skip
    assert code == 0, err and (tmp_path / "x" / "config.json").exists()


def test_extract_and_stream_give_the_same_tensors(zoo, tmp_path):
    base, fts = zoo
    archive = tmp_path / "a.tvq"
    tvq_cli.pack(base, fts[:2], archive)
    out = tmp_path / "rebuilt"
    report = tvq_cli.extract(archive, "t1", base, out)
    written = load_file(str(out / "model.safetensors"))
    streamed = dict(tvq_cli.task_tensors(archive, "t1", base))
    assert list(streamed) == list(written) and all(
        torch.equal(streamed[k], written[k]) for k in written
    )
    config = json.loads((fts[1] / "config.json").read_text())
    config.update(dtype="float32", torch_dtype="float32")  # made true to the weights written
    assert json.loads((out / "config.json").read_text()) == config
    assert report["output"]["files"] == [str(out / "model.safetensors"), str(out / "config.json")]
    other = write_checkpoint(tmp_path / "other", synthetic_model(seed=3), folder=True)
    stream = tvq_cli.task_tensors(archive, "t1", other)
    with pytest.raises(TvqError, match="not the pretrained checkpoint"):
        next(stream)
    with pytest.raises(TvqError, match="not the pretrained checkpoint"):
        tvq_cli.extract(archive, "t1", other, tmp_path / "y")
    assert not (tmp_path / "y").exists()
    with pytest.raises(TvqError, match="no task named 'zz'"):
        tvq_cli.extract(archive, "zz", base, tmp_path / "y")
    code, _, err = run_cli("extract", archive, "--task", "t1", "--pretrained", base, "--out", out)
    assert code == 1 and "already exists" in err


def test_small_files_are_stored_once_checked_and_capped(zoo, tmp_path, monkeypatch):
    base, fts = zoo
    (fts[0] / "tokenizer.json").write_text('{"big": "' + "x" * 5000 + '"}')
    (fts[0] / "optimizer.pt").write_bytes(b"never stored")
    (fts[0] / "README.md").write_text("# my fine-tune")
    monkeypatch.setattr("tvq_cli.io.model_files.MAX_FILE_BYTES", 4096)
    archive = tmp_path / "a.tvq"
    result = tvq_cli.pack(base, fts[:2], archive)
    assert any(
        "left out tokenizer.json (5,011 bytes, over the 4,096 cap)" in n for n in result.notes
    )
    opened = tvq_cli.open_archive(archive)
    assert set(opened.info("t0").files) == {"config.json", "README.md"}
    assert len(opened.header.files) == 2  # config.json is the same for both tasks: stored once
    data = bytearray(archive.read_bytes())
    key = f"file:{opened.info('t0').files['README.md']}"
    start = opened._offsets[key][1]
    data[start + 4] ^= 0xFF
    damaged = tmp_path / "d.tvq"
    damaged.write_bytes(bytes(data))
    with pytest.raises(TvqError, match="checksum mismatch"):
        tvq_cli.open_archive(damaged).task_file("t0", "README.md")
    code, _, err = run_cli("inspect", damaged, "--verify")
    assert code == 1 and "checksum mismatch" in err


def test_names_that_do_not_fit_are_counted(tmp_path):
    pre = synthetic_model()
    base = write_checkpoint(tmp_path / "pre.safetensors", pre)
    renamed = {f"encoder.{k}": v for k, v in finetune(pre, 0).items()}
    prefixed = write_checkpoint(tmp_path / "prefixed.safetensors", renamed)
    result = tvq_cli.pack(base, [prefixed], tmp_path / "a.tvq")
    assert "tensor names removed the prefix 'encoder.'" in " ".join(result.notes)
    other = {f"blocks.{i}.w": v for i, v in enumerate(finetune(pre, 0).values())}
    foreign = write_checkpoint(tmp_path / "foreign.safetensors", other)
    with pytest.raises(TvqError) as error:
        tvq_cli.pack(base, [foreign], tmp_path / "b.tvq")
    message = str(error.value)
    assert (
        "7 of its 7 tensors are not in the pretrained checkpoint ('blocks.0.w', 'blocks.1.w'"
        in message
    )
    assert "and 4 more" in message and "no consistent prefix difference" in message


def test_store_commands(zoo, tmp_path):
    base, fts = zoo
    archive = tmp_path / "a.tvq"
    assert run_cli("pack", "--pretrained", base, *fts[:2], "--out", archive)[0] == 0
    code, out, err = run_cli(
        "add", archive, *fts[2:], "--pretrained", base, "--name", f"ü={fts[3]}"
    )
    assert code == 0, err
    assert out.startswith(f"added 2 tasks (t2, ü) to {archive}: now 4 tasks,")
    code, out, err = run_cli("remove", archive, "--task", "t0", "--task", "t2")
    assert code == 0 and out == f"removed t0, t2 from {archive}: now 2 tasks (t1, ü)\n"
    code, out, err = run_cli(
        "extract", archive, "--task", "ü", "--pretrained", base, "--out", tmp_path / "x",
        "--against", fts[3], "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["against"]["fingerprint"] == "match" and report["against"]["rel_l2"] < 0.2
    code, _, err = run_cli("extract", archive, "--pretrained", base, "--out", tmp_path / "y")
    assert code == 2 and "Missing option '--task'" in err
    code, _, err = run_cli("remove", archive)
    assert code == 2


def test_added_rows_are_kept_exactly_left_out_of_merges_and_extracted(zoo, tmp_path):
    """A fine-tune whose embedding grew by 3 rows (new tokens), in bf16 over an fp32 base."""
    base, fts = zoo
    pre = synthetic_model()
    grown = finetune(pre, 5)
    new_rows = torch.randn(3, 32, generator=torch.Generator().manual_seed(9))
    grown["embed.weight"] = torch.cat([grown["embed.weight"], new_rows])
    grown = {k: v.bfloat16() if v.is_floating_point() else v for k, v in grown.items()}
    chat = write_checkpoint(tmp_path / "chat", grown, folder=True)
    folder = tmp_path / "store"
    tvq_cli.pack(base, [fts[0], chat], folder, max_shard_size="8KB")
    report = tvq_cli.inspect_archive(folder)
    record = report["tasks"][1]
    assert record["added_rows"] == {"embed.weight": 3} and record["dtype"] == "BF16"
    code, out, err = run_cli("merge", folder, "--pretrained", base, "--method", "average",
                             "--out", tmp_path / "m.safetensors")  # fmt: skip
    assert code == 0, err
    assert "3 row(s) task chat added to embed.weight are left out" in out
    assert load_file(str(tmp_path / "m.safetensors"))["embed.weight"].shape == (50, 32)
    tvq_cli.extract(folder, "chat", base, tmp_path / "x.safetensors")
    rebuilt = load_file(str(tmp_path / "x.safetensors"))
    assert rebuilt["embed.weight"].shape == (53, 32)
    assert torch.equal(rebuilt["embed.weight"][50:], grown["embed.weight"][50:])
    assert all(rebuilt[k].dtype == grown[k].dtype for k in grown)
    error = (rebuilt["embed.weight"][:50].float() - grown["embed.weight"][:50].float()).norm()
    assert error / (grown["embed.weight"][:50].float() - pre["embed.weight"]).norm() < 0.2
