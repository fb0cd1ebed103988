import json

import pytest
import torch
from helpers import finetune, make_checkpoints, run_cli, synthetic_model, write_checkpoint
from safetensors.torch import save_file

from tvq_cli.quant.sizes import DEFAULT_CODEC
from tvq_cli.quant.spec import DEFAULT_GROUP_SIZE, DEFAULT_RANGE, DEFAULT_SCALE_BITS


@pytest.fixture
def inputs(tmp_path):
    return make_checkpoints(tmp_path, n_tasks=3)


def _no_litter(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.suffix == ".tvq"]


@pytest.mark.parametrize(
    "args",
    [
        ["--scheme", "tvq", "--bits", "4"],
        ["--scheme", "tvq", "--bits", "3", "--group-size", "0"],
        ["--scheme", "rtvq", "--base-bits", "4", "--offset-bits", "2"],
        ["--scheme", "rtvq", "--no-error-correction"],
        ["--scheme", "fq", "--bits", "8"],
    ],
)
def test_pack_then_inspect_each_scheme(tmp_path, inputs, args):
    pre, fts = inputs
    out = tmp_path / "tasks.tvq"
    code, stdout, stderr = run_cli("pack", "--pretrained", pre, *fts, "--out", out, *args)
    assert code == 0, stderr
    assert stderr == ""  # no progress bar when stderr is not a terminal
    assert "wrote" in stdout and out.exists()
    code, stdout, _ = run_cli("inspect", out)
    assert code == 0 and "bits per weight" in stdout
    code, stdout, _ = run_cli("inspect", out, "--json", "--against", pre, *fts)
    assert code == 0
    report = json.loads(stdout)
    assert [t["name"] for t in report["tasks"]] == ["task0", "task1", "task2"]
    for task in report["tasks"]:
        assert 0 < task["rel_l2"] < 1.5 and -1 <= task["cosine"] <= 1
    assert report["bytes"]["total"] == out.stat().st_size
    parts = report["bytes"]
    assert parts["codes"] + parts["scales"] + parts["exact"] + parts["header"] == parts["total"]


def test_inspect_json_reports_storage_figures(tmp_path, inputs):
    pre, fts = inputs
    out = tmp_path / "tasks.tvq"
    assert run_cli("pack", "--pretrained", pre, *fts, "--out", out, "--bits", "2")[0] == 0
    report = json.loads(run_cli("inspect", out, "--json")[1])
    params = report["parameters"]["total"]
    size = out.stat().st_size
    assert report["bits_per_weight"] == pytest.approx(8 * size / (3 * params))
    assert report["compression"]["vs_fp32"] == pytest.approx(3 * params * 4 / size)
    assert report["quantization"] == [
        {
            "role": "task",
            "bits": 2,
            "group_size": DEFAULT_GROUP_SIZE,
            "range": DEFAULT_RANGE,
            "scale_bits": DEFAULT_SCALE_BITS,
            "codec": DEFAULT_CODEC,
            "parameters": 3 * report["parameters"]["quantized"],
        }
    ]
    assert report["tensors_count"] == {"quantized": 4, "exact": 2, "shared": 1}


def test_more_bits_less_error_and_rtvq_beats_tvq2(tmp_path, inputs):
    pre, fts = inputs
    errors = {}
    for label, args in {
        "tvq2": ["--bits", "2"],
        "tvq4": ["--bits", "4"],
        "rtvq": ["--scheme", "rtvq"],
    }.items():
        out = tmp_path / f"{label}.tvq"
        assert run_cli("pack", "--pretrained", pre, *fts, "--out", out, *args)[0] == 0
        report = json.loads(run_cli("inspect", out, "--json", "--against", pre, *fts)[1])
        errors[label] = report["error"]["rel_l2"]
    assert errors["tvq4"] < errors["rtvq"] < errors["tvq2"]


def test_per_tensor_report(tmp_path, inputs):
    pre, fts = inputs
    out = tmp_path / "tasks.tvq"
    run_cli("pack", "--pretrained", pre, *fts, "--out", out)
    report = json.loads(run_cli("inspect", out, "--json", "--tensors", "--against", pre, *fts)[1])
    rows = {(r["task"], r["tensor"]): r for r in report["tensors"]}
    assert rows[("task0", "layers.0.fc.bias")]["rel_l2"] == 0.0  # 1-D: stored exactly
    assert rows[("task0", "layers.0.fc.weight")]["rel_l2"] > 0.0
    code, stdout, _ = run_cli("inspect", out, "--tensors")
    assert code == 0 and "layers.1.fc.weight" in stdout


def test_keep_glob_and_names(tmp_path, inputs):
    pre, fts = inputs
    out = tmp_path / "tasks.tvq"
    code, _, err = run_cli(
        "pack",
        "--pretrained",
        pre,
        *fts,
        "--out",
        out,
        "--keep",
        "embed.*",
        "--name",
        f"alpha={fts[0]}",
    )
    assert code == 0, err
    report = json.loads(run_cli("inspect", out, "--json", "--tensors")[1])
    kinds = {r["tensor"]: r["kind"] for r in report["tensors"]}
    assert kinds["embed.weight"] == "exact" and kinds["head.weight"] == "quantized"
    assert [t["name"] for t in report["tasks"]] == ["alpha", "task1", "task2"]


def test_dry_run_writes_nothing_and_predicts_size(tmp_path, inputs):
    pre, fts = inputs
    code, stdout, _ = run_cli("pack", "--pretrained", pre, *fts, "--dry-run", "--scheme", "rtvq")
    assert code == 0 and "dry run" in stdout
    predicted = int(stdout.split("dry run: ")[1].split(" bytes")[0])
    out = tmp_path / "tasks.tvq"
    run_cli("pack", "--pretrained", pre, *fts, "--out", out, "--scheme", "rtvq")
    assert out.stat().st_size == predicted


def _bad_inputs(tmp_path, case):
    pre_tensors = synthetic_model()
    pre = write_checkpoint(tmp_path / "pre.safetensors", pre_tensors)
    ft = finetune(pre_tensors, 0)
    if case == "missing_key":
        ft.pop("head.weight")
    elif case == "shape":
        ft["head.weight"] = torch.zeros(10, 31)
    elif case == "dtype":
        ft["head.weight"] = ft["head.weight"].double()  # fp16 and bf16 are fine (mixed dtypes)
    elif case == "nan":
        ft["layers.1.fc.weight"][3, 3] = float("nan")
    elif case == "buffer":
        ft["position_ids"] = ft["position_ids"] + 1
    good = write_checkpoint(tmp_path / "good.safetensors", finetune(pre_tensors, 1))
    bad = write_checkpoint(tmp_path / "bad.safetensors", ft)
    return pre, [good, bad]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_key", "tensor head.weight is missing"),
        ("shape", "tensor head.weight has shape [10, 31]"),
        ("dtype", "tensor head.weight has dtype F64"),
        ("nan", "tensor layers.1.fc.weight contains NaN or Inf"),
        ("buffer", "non-float tensor position_ids differs"),
    ],
)
def test_bad_inputs_fail_cleanly(tmp_path, case, message):
    pre, fts = _bad_inputs(tmp_path, case)
    out = tmp_path / "tasks.tvq"
    code, stdout, stderr = run_cli("pack", "--pretrained", pre, *fts, "--out", out)
    assert code == 1
    assert stderr.startswith("tvq: error: ") and stderr.count("\n") == 1
    assert message in stderr and "Traceback" not in stderr
    assert _no_litter(tmp_path) == []


@pytest.mark.parametrize(
    ("extra", "message", "exit_code"),
    [
        (["--bits", "9"], "bits must be between 1 and 8", 2),
        (["--bits", "0"], "bits must be between 1 and 8", 2),
        (["--scheme", "gptq"], "unknown scheme 'gptq'", 2),
        (["--group-size", "-4"], "group size", 2),
        (["--name", "nonsense"], "--name expects NAME=PATH", 2),
        (["--frobnicate"], "No such option", 2),
        (["--threads", "0"], "--threads must be at least 1", 2),
        (["--device", "tpu"], "--device must be cpu or cuda", 2),
        (["--budget", "-1"], "budget must be a positive", 2),
    ],
)
def test_bad_options_fail_cleanly(tmp_path, inputs, extra, message, exit_code):
    pre, fts = inputs
    out = tmp_path / "tasks.tvq"
    code, _, stderr = run_cli("pack", "--pretrained", pre, *fts, "--out", out, *extra)
    assert code == exit_code and message in stderr and stderr.count("\n") == 1
    assert not out.exists()


def test_missing_and_non_safetensors_inputs(tmp_path, inputs):
    pre, fts = inputs
    out = tmp_path / "tasks.tvq"
    code, _, stderr = run_cli("pack", "--pretrained", tmp_path / "nope", *fts, "--out", out)
    assert code == 1 and "nope: no such file or folder" in stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    code, _, stderr = run_cli("pack", "--pretrained", pre, junk, "--out", out)
    assert code == 1 and "not a readable safetensors file" in stderr
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    code, _, stderr = run_cli("pack", "--pretrained", pre, empty_dir, "--out", out)
    assert code == 1 and "neither model.safetensors" in stderr
    assert not out.exists()


def test_duplicate_names_and_overwrite_rules(tmp_path, inputs):
    pre, fts = inputs
    out = tmp_path / "tasks.tvq"
    code, _, stderr = run_cli("pack", "--pretrained", pre, fts[0], fts[0], "--out", out)
    assert code == 2 and "duplicate task name 'task0'" in stderr
    code, _, stderr = run_cli("pack", "--pretrained", pre, *fts, "--out", fts[0])
    assert code == 1 and "refusing to overwrite an input" in stderr
    assert run_cli("pack", "--pretrained", pre, *fts, "--out", out)[0] == 0
    before = out.read_bytes()
    code, _, stderr = run_cli("pack", "--pretrained", pre, *fts, "--out", out, "--bits", "2")
    assert code == 1 and "already exists" in stderr and out.read_bytes() == before
    assert (
        run_cli("pack", "--pretrained", pre, *fts, "--out", out, "--bits", "2", "--force")[0] == 0
    )
    assert out.read_bytes() != before


def test_inspect_errors(tmp_path, inputs):
    pre, fts = inputs
    out = tmp_path / "tasks.tvq"
    run_cli("pack", "--pretrained", pre, *fts, "--out", out)
    code, _, stderr = run_cli("inspect", out, "--against", pre, fts[0])
    assert code == 2 and "needs the pretrained checkpoint and 3 fine-tuned" in stderr
    other = write_checkpoint(tmp_path / "other.safetensors", synthetic_model(seed=5))
    code, _, stderr = run_cli("inspect", out, "--against", other, *fts)
    assert code == 1 and "is not the pretrained checkpoint" in stderr
    code, _, stderr = run_cli("inspect", pre)
    assert code == 1 and "not a tvq archive" in stderr


def test_error_mid_write_leaves_previous_archive_and_no_litter(tmp_path, inputs):
    pre, fts = inputs
    out = tmp_path / "tasks.tvq"
    run_cli("pack", "--pretrained", pre, *fts, "--out", out)
    before = out.read_bytes()
    tensors = finetune(synthetic_model(), 7)
    tensors["position_ids"] = tensors["position_ids"] * 2  # fails on the last tensor
    save_file(tensors, str(tmp_path / "late_bad.safetensors"))
    code, _, stderr = run_cli(
        "pack",
        "--pretrained",
        pre,
        fts[0],
        tmp_path / "late_bad.safetensors",
        "--out",
        out,
        "--force",
    )
    assert code == 1 and "position_ids differs" in stderr
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
