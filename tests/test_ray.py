"""`--ray`: sharded archives and merged model folders written by the tasks of a real local Ray
cluster (2 worker processes), byte for byte what one process writes. Without the extra
(`tvq-cli[ray]`) only the missing-Ray error is tested."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import make_checkpoints, run_cli

from tvq_cli.merge import MergeRequest, merge
from tvq_cli.pack import PackOptions, pack


@pytest.fixture(scope="module")
def ray():
    return pytest.importorskip("ray")


def test_missing_ray_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    pre, fts = make_checkpoints(tmp_path, 2)
    out = tmp_path / "a.tvq"
    code, _, err = run_cli(
        "pack", *fts, "--pretrained", pre, "-o", out, "--max-shard-size", "5KB", "--ray", "local"
    )
    assert (code, err) == (1, "tvq: error: --ray needs Ray: pip install 'tvq-cli[ray]'\n")
    assert not out.exists()


def test_unreachable_cluster_is_one_line(tmp_path, ray):
    """Runs before the module's cluster starts: an open session would be used instead."""
    assert not ray.is_initialized()
    pre, fts = make_checkpoints(tmp_path, 2)
    out = tmp_path / "a.tvq"
    code, _, err = run_cli(
        "pack", *fts, "--pretrained", pre, "-o", out, "--max-shard-size", "5KB",
        "--ray", "127.0.0.1:9",
    )  # fmt: skip
    assert code == 1
    assert err.startswith("tvq: error: --ray: cannot reach Ray at 127.0.0.1:9")
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def cluster(ray):
    """One local cluster for the module (starting one takes seconds): the library's
    `ray="local"` uses the session already open."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp = tempfile.mkdtemp(prefix="tvqray-", dir="/tmp")  # short paths for Ray's sockets
    ray.init(
        num_cpus=2,
        object_store_memory=100 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=temp,
    )
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def files(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder by name."""
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def outputs(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """The same output name in two folders: shard names and the index hold the name."""
    (tmp_path / "one").mkdir(exist_ok=True)
    (tmp_path / "two").mkdir(exist_ok=True)
    return tmp_path / "one" / name, tmp_path / "two" / name


@pytest.mark.parametrize(
    "options", [PackOptions(), PackOptions(scheme="rtvq", codec="raw")], ids=["tvq", "rtvq"]
)
def test_pack_on_ray_is_the_single_process_archive(tmp_path, cluster, options):
    pre, fts = make_checkpoints(tmp_path, 3)
    out_one, out_two = outputs(tmp_path, "tasks.tvq")
    one = pack(pre, fts, out_one, options, max_shard_size="3KB")
    two = pack(pre, fts, out_two, options, max_shard_size="3KB", ray="local")
    shards = files(out_one)
    assert len([n for n in shards if n.endswith(".tvq")]) >= 3  # work for both workers
    assert files(out_two) == shards
    assert two.header.to_json() == one.header.to_json()


def test_merge_on_ray_is_the_single_process_model(tmp_path, cluster):
    pre, fts = make_checkpoints(tmp_path, 3)
    archive = tmp_path / "tasks.tvq"
    pack(pre, fts, archive)
    for method, options in [("task_arithmetic", {"lambda": 0.5}), ("ties", {})]:
        folders = outputs(tmp_path, method)
        for out, ray_address in zip(folders, [None, "local"], strict=True):
            request = MergeRequest(
                [archive],
                pre,
                out,
                method,
                options,
                max_shard_size="4KB",
                ray=ray_address,
            )
            merge(request)
        shards = files(folders[0])
        assert len([n for n in shards if n.endswith(".safetensors")]) >= 3
        assert files(folders[1]) == shards


def test_ray_refuses_what_it_cannot_split(tmp_path, cluster):
    pre, fts = make_checkpoints(tmp_path, 2)
    code, _, err = run_cli(
        "pack", *fts, "--pretrained", pre, "-o", tmp_path / "a.tvq", "--ray", "local"
    )
    assert code == 2 and "--max-shard-size" in err and len(err.strip().splitlines()) == 1
    archive = tmp_path / "t.tvq"
    pack(pre, fts, archive)
    code, _, err = run_cli(
        "merge", archive, "--pretrained", pre, "-m", "ties", "-o", tmp_path / "m.safetensors",
        "--ray", "local",
    )  # fmt: skip
    assert code == 2 and "folder" in err
    assert not (tmp_path / "m.safetensors").exists()
    code, _, err = run_cli(  # low-rate records of small tensors share a frame across shards
        "pack", *fts, "--pretrained", pre, "-o", tmp_path / "low", "--budget", "3",
        "--max-shard-size", "5KB", "--ray", "local",
    )  # fmt: skip
    assert code == 2 and "low-rate" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "low").exists()


def test_command_line_flags_reach_ray(tmp_path, cluster):
    pre, fts = make_checkpoints(tmp_path, 2)
    one, two = outputs(tmp_path, "tasks.tvq")
    for out, extra in [(one, []), (two, ["--ray", "local"])]:
        code, _, err = run_cli(
            "pack", *fts, "--pretrained", pre, "-o", out, "--max-shard-size", "3KB", "-q", *extra
        )
        assert code == 0, err
    assert files(two) == files(one)
    merged = [tmp_path / "one" / "merged", tmp_path / "two" / "merged"]
    for out, extra in zip(merged, [[], ["--ray", "local"]], strict=True):
        code, _, err = run_cli(
            "merge", one, "--pretrained", pre, "-m", "task_arithmetic", "-o", out,
            "--max-shard-size", "4KB", "-q", *extra,
        )  # fmt: skip
        assert code == 0, err
    assert files(merged[1]) == files(merged[0])
