import json

import numpy as np
import pytest
import torch
from helpers import finetune, make_checkpoints, synthetic_model, write_checkpoint
from safetensors import safe_open

from tvq_cli import PackOptions, TvqError, open_archive, pack
from tvq_cli.archive import ArchiveHeader, ArchiveWriter, Part, TensorEntry
from tvq_cli.archive.format import layout
from tvq_cli.archive.parts import encode_part
from tvq_cli.archive.writer import archive_size
from tvq_cli.pack import dry_run
from tvq_cli.quant.quantizer import dequantize, quantize
from tvq_cli.quant.spec import DEFAULT_GROUP_SIZE, DEFAULT_RANGE, DEFAULT_SCALE_BITS, QuantSpec


@pytest.fixture
def inputs(tmp_path):
    return make_checkpoints(tmp_path, n_tasks=3)


def _load(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("scheme", ["tvq", "rtvq", "fq"])
def test_archive_is_plain_safetensors_and_header_round_trips(tmp_path, inputs, scheme):
    pre, fts = inputs
    out = tmp_path / "a.tvq"
    result = pack(pre, fts, out, PackOptions(scheme=scheme))
    with safe_open(str(out), "np") as f:
        keys = list(f.keys())  # noqa: SIM118
        meta = f.metadata()
        one = f.get_tensor(keys[0])
    assert one.size > 0
    header = ArchiveHeader.from_json(meta["tvq"])
    assert header.to_json() == result.header.to_json()
    assert sorted(keys) == sorted(s.key for s in layout(header))
    assert json.loads(meta["tvq"])["format"] == "tvq-archive"
    assert header.tasks == ["task0", "task1", "task2"]
    assert out.stat().st_size == archive_size(header)
    assert dry_run(pre, fts, PackOptions(scheme=scheme)).size_bytes == out.stat().st_size


def test_key_names_show_role_task_and_tensor(tmp_path, inputs):
    pre, fts = inputs
    out = tmp_path / "a.tvq"
    pack(pre, fts, out, PackOptions(scheme="rtvq"))
    keys = set(_load(out))
    assert "base:layers.0.fc.weight:codes" in keys
    assert "offset:task1:layers.0.fc.weight:scales" in keys
    assert "delta:task2:layers.0.fc.bias" in keys
    assert "shared:position_ids" in keys


def test_tvq_task_vectors_match_direct_quantization(tmp_path, inputs):
    pre, fts = inputs
    out = tmp_path / "a.tvq"
    pack(pre, fts, out, PackOptions(scheme="tvq", bits=3, group_size=16))
    archive = open_archive(out)
    theta_pre, theta_1 = _load(pre), _load(fts[1])
    name = "layers.1.fc.weight"
    tau = theta_1[name] - theta_pre[name]
    spec = archive.entry(name).parts[1].spec  # the default range search and compact scales
    assert spec == QuantSpec(3, 16, DEFAULT_RANGE, DEFAULT_SCALE_BITS)
    expected = dequantize(quantize(tau, spec), spec, tuple(tau.shape))
    assert torch.equal(archive.task_vector("task1", name), expected)
    # 1-D tensors are exact fp32 deltas; non-float buffers come back unchanged.
    bias = "layers.0.fc.bias"
    assert torch.equal(archive.task_vector("task1", bias), theta_1[bias] - theta_pre[bias])
    assert torch.equal(archive.shared("position_ids"), theta_pre["position_ids"])


@pytest.mark.parametrize("error_correction", [True, False])
def test_rtvq_reconstruction_follows_algorithm_1(tmp_path, inputs, error_correction):
    pre, fts = inputs
    out = tmp_path / "a.tvq"
    options = PackOptions(
        scheme="rtvq", base_bits=3, offset_bits=2, group_size=32, error_correction=error_correction
    )
    pack(pre, fts, out, options)
    archive = open_archive(out)
    name = "layers.0.fc.weight"
    theta_pre = _load(pre)[name]
    thetas = [_load(p)[name] for p in fts]
    base = torch.stack(thetas).mean(0) - theta_pre
    base_spec = QuantSpec(3, 32, DEFAULT_RANGE, DEFAULT_SCALE_BITS)
    off_spec = QuantSpec(2, 32, DEFAULT_RANGE, DEFAULT_SCALE_BITS)
    base_hat = dequantize(quantize(base, base_spec), base_spec, tuple(base.shape))
    anchor = theta_pre + base_hat if error_correction else theta_pre + base
    for i, theta in enumerate(thetas):
        offset = theta - anchor
        offset_hat = dequantize(quantize(offset, off_spec), off_spec, tuple(offset.shape))
        got = archive.task_vector(f"task{i}", name)
        assert torch.allclose(got, base_hat + offset_hat, atol=1e-6)


def test_fq_needs_pretrained_and_subtracts_it(tmp_path, inputs):
    pre, fts = inputs
    out = tmp_path / "a.tvq"
    pack(pre, fts, out, PackOptions(scheme="fq", bits=8))
    archive = open_archive(out)
    name = "head.weight"
    theta_pre, theta_0 = _load(pre)[name], _load(fts[0])[name]
    with pytest.raises(TvqError, match="pretrained"):
        archive.task_vector("task0", name)
    spec = QuantSpec(8, DEFAULT_GROUP_SIZE, DEFAULT_RANGE, DEFAULT_SCALE_BITS)
    expected = dequantize(quantize(theta_0, spec), spec, tuple(theta_0.shape)) - theta_pre
    assert torch.allclose(archive.task_vector("task0", name, theta_pre), expected)


def test_bits_and_group_size_may_differ_per_tensor_and_role(tmp_path):
    x = torch.randn(8, 24)
    entries = [
        TensorEntry(
            "a",
            (8, 24),
            "F32",
            "quantized",
            [Part("base", 5, 0), Part("offset:t1", 2, 8), Part("offset:t2", 7, 24)],
        ),
        TensorEntry(
            "b",
            (8, 24),
            "BF16",
            "quantized",
            [Part("base", 1, 3), Part("offset:t1", 8, 0), Part("offset:t2", 3, 5)],
        ),
    ]
    header = ArchiveHeader("rtvq", ["t1", "t2"], "test", "sha256:" + "0" * 64, entries, True)
    out = tmp_path / "mixed.tvq"
    expected = {}
    with ArchiveWriter(out, header) as writer:
        for entry in entries:
            for part in entry.parts:
                q = quantize(x, part.spec)
                for key, data in encode_part(part, entry.name, entry.shape, q):
                    writer.write(key, data)
                expected[(entry.name, part.role)] = dequantize(q, part.spec, (8, 24))
    archive = open_archive(out)
    for entry in archive.header.tensors:
        for part in entry.parts:
            assert torch.equal(archive.dequantized(part, entry), expected[(entry.name, part.role)])
    got = archive.task_vector("t2", "b")
    assert torch.equal(got, expected[("b", "base")] + expected[("b", "offset:t2")])


def test_sharded_and_folder_inputs_give_the_same_task_vectors(tmp_path):
    """The same weights as files or (sharded) folders: the same stored tensors; the folders'
    config.json is kept as well, once for both tasks."""
    pre_tensors = synthetic_model(dtype=torch.bfloat16)
    ft_tensors = [finetune(pre_tensors, i) for i in range(2)]
    file_pre = write_checkpoint(tmp_path / "pre.safetensors", pre_tensors)
    file_fts = [
        write_checkpoint(tmp_path / f"t{i}.safetensors", t) for i, t in enumerate(ft_tensors)
    ]
    # A sharded folder: two shards plus an index, as Hugging Face writes them.
    sharded = tmp_path / "pre_sharded"
    sharded.mkdir()
    names = sorted(pre_tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:3],
        "model-00002-of-00002.safetensors": names[3:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        write_checkpoint(sharded / shard, {k: pre_tensors[k] for k in keys})
        weight_map.update({k: shard for k in keys})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    folder_fts = [
        write_checkpoint(tmp_path / f"t{i}", t, folder=True) for i, t in enumerate(ft_tensors)
    ]
    a, b = tmp_path / "a.tvq", tmp_path / "b.tvq"
    pack(file_pre, file_fts, a)
    pack(sharded, folder_fts, b)
    from_files, from_folders = open_archive(a), open_archive(b)
    assert [s.key for s in from_folders.stored if not s.key.startswith("file:")] == [
        s.key for s in from_files.stored
    ]
    for stored in from_files.stored:
        assert np.array_equal(from_files.raw(stored.key), from_folders.raw(stored.key))
    assert len(from_folders.header.files) == 1
    assert (
        from_folders.task_file("t1", "config.json") == (folder_fts[1] / "config.json").read_bytes()
    )
    assert from_files.header.tensors[0].dtype == "BF16"
