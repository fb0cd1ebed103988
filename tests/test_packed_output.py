"""`tvq merge --quantize`: compressed-tensors pack-quantized folders.

Our packing and grid are checked byte for byte against the compressed-tensors package, and the
folders are loaded with transformers (a tiny random Llama built here) and into the example
zoo's backbone. The package tests skip without `pip install 'tvq-cli[deploy]'`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli, write_checkpoint
from safetensors.torch import load_file

from tvq_cli.io.checkpoint import Checkpoint
from tvq_cli.quant import packed_int
from tvq_cli.quant.packed_int import PackedScheme
from tvq_cli.zoo import Zoo, evaluate, evaluate_state, mean_accuracy
from tvq_cli.zoo.store import load_state, unpacked_state


def _merge(*args) -> dict:
    code, out, err = run_cli("merge", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_int4_packs_element_zero_in_the_low_nibble():
    codes = torch.tensor([[-8, -7, -6, -5, 0, 1, 2, 7]], dtype=torch.int8)
    word = packed_int.pack_codes(codes, PackedScheme(4, 0))
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    assert int(word) & 0xFFFFFFFF == 0xFA983210


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_round_trips_along_both_dimensions(bits):
    scheme = PackedScheme(bits, 0)
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(scheme.qmin, scheme.qmax + 1, (7, 45), generator=gen)
    packed = packed_int.pack_codes(codes, scheme)
    assert packed.shape == (7, scheme.packed_words(45))
    back = packed_int.unpack_int32(packed, bits, 45).to(torch.int16) + scheme.qmin
    assert torch.equal(back, codes.to(torch.int16))
    zeros = packed_int.pack_zero_points(codes, scheme)
    assert zeros.shape == (scheme.packed_words(7), 45)
    back = packed_int.unpack_int32(zeros.t().contiguous(), bits, 7).t().to(torch.int16)
    assert torch.equal(back + scheme.qmin, codes.to(torch.int16))


def test_packing_matches_the_package_for_every_width():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(0)
    for bits in range(2, 9):
        scheme = PackedScheme(bits, 0)
        for shape in ((5, 37), (33, 96), (1, 1)):
            codes = torch.randint(scheme.qmin, scheme.qmax + 1, shape, generator=gen)
            codes = codes.to(torch.int8)
            assert torch.equal(
                packed_int.pack_codes(codes, scheme), helpers.pack_to_int32(codes, bits, 1)
            )
            assert torch.equal(
                packed_int.pack_zero_points(codes, scheme), helpers.pack_to_int32(codes, bits, 0)
            )


# --- a tiny Llama ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict:
    """A random tiny Llama (pretrained folder with a tokenizer), two fine-tunes and a 4-bit
    TVQ archive of them."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    pre = root / "pre"
    model.save_pretrained(pre)
    vocab = {chr(32 + i): i for i in range(96)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token=" "))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=" ").save_pretrained(pre)
    state = load_file(pre / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    tasks = []
    for t in range(2):
        tuned = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        tasks.append(write_checkpoint(root / f"task{t}.safetensors", tuned))
    archive = root / "tasks.tvq"
    code, _, err = run_cli("pack", *tasks, "--pretrained", pre, "--out", archive, "-q")
    assert code == 0, err
    ids = torch.randint(0, 96, (2, 12), generator=gen)
    return {"root": root, "pre": pre, "archive": archive, "config": config, "ids": ids}


def _logits_of_state(llama: dict, state: dict[str, torch.Tensor]) -> torch.Tensor:
    import transformers

    model = transformers.LlamaForCausalLM(llama["config"]).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(llama["ids"]).logits


def _load_packed(path: Path, dequantize: bool) -> torch.nn.Module:
    import transformers

    options = {}
    if dequantize:
        options["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, **options).eval()


@pytest.mark.parametrize(
    ("scheme", "extra", "default_load"),
    [
        ("w4", ["--group-size", "32"], True),
        ("w8", [], True),
        ("w4", ["--group-size", "32", "--asymmetric"], False),  # package bug: dequantize only
    ],
)
def test_packed_llama_loads_in_transformers_as_its_dequantized_weights(
    llama, tmp_path, scheme, extra, default_load
):
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "packed"
    common = (llama["archive"], "--pretrained", llama["pre"], "--method", "task_arithmetic")
    report = _merge(*common, "--out", out, "--quantize", scheme, *extra)
    quantization = report["output"]["quantization"]
    assert report["output"]["format"] == "compressed-tensors"
    assert quantization["layers_from"] == "transformers" and quantization["packed"] == 14
    assert quantization["ignore"] == ["lm_head"]
    assert (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quantization_status"] == "compressed" and config["ignore"] == ["lm_head"]
    ours = unpacked_state(load_state(out), config, out)
    expected = _logits_of_state(llama, ours)
    loaded = _load_packed(out, dequantize=not default_load)
    with torch.no_grad():
        logits = loaded(llama["ids"]).logits
    assert torch.allclose(logits, expected, atol=1e-5)
    dense = tmp_path / "dense"
    _merge(*common, "--out", dense)
    full = _logits_of_state(llama, load_file(dense / "model.safetensors"))
    assert 0 < float((expected - full).abs().max()) < 0.2  # quantized, and close


@pytest.mark.parametrize("scheme", [PackedScheme(4, 32), PackedScheme(8, 0, symmetric=False)])
def test_nearest_rounding_writes_the_packages_bytes(llama, tmp_path, scheme):
    """Quantizing our dense merge with the package gives byte for byte our packed tensors."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    common = (llama["archive"], "--pretrained", llama["pre"], "--method", "ties")
    name = "w4" if scheme.bits == 4 else "w8"
    symmetry = "--symmetric" if scheme.symmetric else "--asymmetric"
    packed, dense = tmp_path / "packed", tmp_path / "dense"
    _merge(
        *common, "--out", packed, "--quantize", name, "--group-size", scheme.group_size, symmetry
    )
    _merge(*common, "--out", dense)
    ours, merged = load_file(packed / "model.safetensors"), load_file(dense / "model.safetensors")
    weights = packed_int.weights_args(scheme)
    args = QuantizationArgs(**{k: v for k, v in weights.items() if v is not None})
    qscheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    compressor = ct.compressors.PackedQuantizationCompressor
    modules = [k.removesuffix(".weight_packed") for k in ours if k.endswith(".weight_packed")]
    assert len(modules) == 14
    for module in modules:
        weight = merged[f"{module}.weight"]
        groups = packed_int.grouped(weight, scheme)
        step, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        reference = compressor.compress(
            {"weight": weight, "weight_scale": step, "weight_zero_point": zero}, qscheme
        )
        for key, tensor in reference.items():
            assert torch.equal(ours[f"{module}.{key}"], tensor), (module, key)
        assert set(reference) == {k.split(".")[-1] for k in ours if k.startswith(module + ".")}


def test_ragged_groups_and_ignored_layers_stay_dense_and_are_listed(llama, tmp_path):
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "packed"
    report = _merge(
        llama["archive"], "--pretrained", llama["pre"], "--method", "average", "--out", out,
        "--quantize", "w4", "--quantize-ignore", "*.o_proj",
    )  # fmt: skip
    ignore = report["output"]["quantization"]["ignore"]
    # group 128: only down_proj (in 128) splits into whole groups; o_proj is ignored by glob
    assert report["output"]["quantization"]["packed"] == 2
    assert "lm_head" in ignore and "model.layers.0.self_attn.o_proj" in ignore
    assert "model.layers.1.mlp.down_proj" not in ignore and len(ignore) == 13
    state = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.o_proj.weight" in state
    assert "model.layers.0.mlp.down_proj.weight_packed" in state
    reference = _logits_of_state(llama, unpacked_state(state, _config(out), out))
    with torch.no_grad():
        logits = _load_packed(out, dequantize=False)(llama["ids"]).logits
    assert torch.allclose(logits, reference, atol=1e-5)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def test_bf16_model_keeps_bf16_scales_and_loads(llama, tmp_path):
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "packed"
    _merge(
        llama["archive"], "--pretrained", llama["pre"], "--method", "task_arithmetic",
        "--out", out, "--quantize", "w8", "--dtype", "bf16",
    )  # fmt: skip
    state = load_file(out / "model.safetensors")
    assert state["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert state["model.norm.weight"].dtype == torch.bfloat16
    ours = unpacked_state(state, _config(out), out)
    loaded = _load_packed(out, dequantize=True)
    weights = dict(loaded.named_parameters())
    for name, tensor in ours.items():
        assert torch.equal(weights[name].to(torch.bfloat16), tensor.to(torch.bfloat16)), name


# --- the example zoo (not a transformers architecture) ------------------------------------------


def test_packed_zoo_merge_decompresses_into_the_backbone(zoo: Zoo, tmp_path):
    fts = list(zoo.tasks.values())
    archive = tmp_path / "tasks.tvq"
    code, _, err = run_cli("pack", *fts, "--pretrained", zoo.pretrained.parent, "--out", archive)
    assert code == 0, err
    common = (archive, "--pretrained", zoo.pretrained.parent, "--method", "task_arithmetic")
    out = tmp_path / "ta-w4"
    report = _merge(*common, "--out", out, "--quantize", "w4", "--group-size", "32")
    quantization = report["output"]["quantization"]
    assert quantization["layers_from"] == "2-D weights"
    assert quantization["ignore"] == ["embed"] and quantization["packed"] == 6
    dense = tmp_path / "ta.safetensors"
    _merge(*common, "--out", dense)
    packed_acc = mean_accuracy(evaluate(out, zoo))
    dense_acc = mean_accuracy(evaluate(dense, zoo))
    assert abs(packed_acc - dense_acc) < 1.5  # 4-bit weights cost little on the zoo
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    # the package's own decompression gives the same weights as our reader
    stored = load_file(out / "model.safetensors")
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=32, symmetric=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    state = load_state(out)
    for i in range(6):
        module = f"layers.{i}.fc"
        local = {
            k.removeprefix(module + "."): v
            for k, v in stored.items()
            if k.startswith(module + ".weight_")
        }
        decompressed = ct.compressors.PackedQuantizationCompressor.decompress(local, scheme)
        assert torch.equal(decompressed["weight"], state[f"{module}.weight"])
    assert mean_accuracy(evaluate_state(state, zoo)) == packed_acc


# --- errors ------------------------------------------------------------------------------------


def test_packed_output_refusals(tmp_path):
    pytest.importorskip("transformers")  # finds the Linear layers
    pre = write_checkpoint(tmp_path / "pre", {"w.weight": torch.ones(4, 32)}, folder=True)
    tuned = write_checkpoint(tmp_path / "t.safetensors", {"w.weight": torch.full((4, 32), 2.0)})
    archive = tmp_path / "a.tvq"
    assert run_cli("pack", tuned, "--pretrained", pre, "--out", archive, "-q")[0] == 0
    file_pre = write_checkpoint(tmp_path / "pre.safetensors", {"w.weight": torch.ones(4, 32)})
    common = (archive, "--method", "average")
    cases = [
        ((*common, "--pretrained", pre, "--out", tmp_path / "o", "--quantize", "w5"),
         "--quantize must be one of w4, w8"),
        ((*common, "--pretrained", pre, "--out", tmp_path / "o.tvq", "--quantize", "w4"),
         "--quantize writes a model folder"),
        ((*common, "--pretrained", pre, "--out", tmp_path / "o", "--quantize", "w4",
          "--bits", "4"), "--bits applies only to a .tvq output"),
        ((*common, "--pretrained", pre, "--out", tmp_path / "o", "--asymmetric"),
         "--symmetric applies only to a --quantize output"),
        ((*common, "--pretrained", pre, "--out", tmp_path / "o", "--rounding", "noise"),
         "--rounding applies only to a quantized output"),
        ((*common, "--pretrained", file_pre, "--out", tmp_path / "o", "--quantize", "w4",
          "--force"), "needs --pretrained to be a model folder"),
        ((*common, "--pretrained", pre, "--out", tmp_path / "o", "--quantize", "w4",
          "--quantize-ignore", "w"), "no Linear weight to quantize"),
        ((*common, "--pretrained", pre, "--out", tmp_path / "o", "--quantize", "w4",
          "--rounding", "up"), "--rounding must be one of nearest, floor, noise"),
    ]  # fmt: skip
    for args, message in cases:
        code, _, err = run_cli("merge", *args)
        assert code != 0 and message in err, (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tvq").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # the synthetic config's model_type is unknown to transformers: 2-D weights are the Linears
    out = tmp_path / "o"
    report = _merge(
        *common, "--pretrained", pre, "--out", out, "--quantize", "w4", "--group-size", 32
    )
    assert report["output"]["quantization"]["layers_from"] == "2-D weights"
    assert Checkpoint(tmp_path / "o").specs["w.weight_packed"].shape == (4, 4)
