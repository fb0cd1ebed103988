"""Packed merge output: the merged model as a compressed-tensors `pack-quantized` folder.

The merged weights of every Linear layer are put on an integer grid (`--quantize w4|w8`) and
written as int32-packed codes with their steps (and zero-points when asymmetric); embeddings,
norms, biases, `lm_head` and the layers matching `--quantize-ignore` stay dense. The folder
loads in transformers (which decompresses it through compressed-tensors), and vLLM's
compressed-tensors loader reads the same layout.
Written tensor by tensor like any merged model (`io.ModelWriter`): the header is planned from
the pretrained model's header, so at most one tensor's task vectors and merge are in memory.

Every Linear left dense is listed in `ignore`: otherwise the loader builds packed parameters
for it, only logs the missing keys, and the model runs on uninitialized weights. Likewise
`quantization_status` must be "compressed". Layouts and the loader's needs are in
docs/merge.md ("Packed output").
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch

from ..dtypes import OUTPUT_DTYPES, from_torch, to_torch
from ..errors import InternalError, TvqError, UsageError
from ..io.atomic import atomic_output
from ..io.checkpoint import TensorSpec
from ..io.linear_layers import CONFIG, linear_layers
from ..io.model_writer import ModelWriter
from ..quant import packed_int
from ..quant.packed_int import PackedScheme
from .base import derive_generator
from .engine import Engine
from .model_out import output_specs
from .on_grid import first_output
from .request import Merge
from .rounding import MergedTensor, Rounding, RoundingTally, StepGrid, round_on_grid

SCHEMES = {"w4": 4, "w8": 8}
DEFAULT_GROUP = {"w4": 128, "w8": 0}  # compressed-tensors' W4A16 preset; w8 per channel
DEFAULT_IGNORE = ("lm_head", "*embed*")
FORMAT = "pack-quantized"
LAYOUT_VERSION = "0.20.1"  # the compressed-tensors release whose layout this follows


def packed_scheme(name: str, group_size: int | None, symmetric: bool | None) -> PackedScheme:
    if name not in SCHEMES:
        raise UsageError(f"--quantize must be one of {', '.join(SCHEMES)}, got {name!r}")
    group = DEFAULT_GROUP[name] if group_size is None else group_size
    return PackedScheme(SCHEMES[name], group, True if symmetric is None else symmetric)


def quantization_config(scheme: PackedScheme, ignore: list[str]) -> dict:
    """config.json's `quantization_config`, with the keys compressed-tensors writes."""
    return {
        "config_groups": {
            "group_0": {
                "format": FORMAT,
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": packed_int.weights_args(scheme),
            }
        },
        "format": FORMAT,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": LAYOUT_VERSION,
    }


class PackedOutput:
    """Decides which weights are packed, then writes the folder tensor by tensor."""

    def __init__(self, merge: Merge, rounding: Rounding):
        request = merge.request
        self.merge, self.rounding = merge, rounding.for_grid(exact_ties=False)
        self.pre = merge.pretrained
        if not self.pre.path.is_dir():
            raise TvqError("--quantize needs --pretrained to be a model folder with config.json")
        self.scheme = packed_scheme(request.quantize, request.group_size, request.symmetric)
        self.globs = (*DEFAULT_IGNORE, *(request.quantize_ignore or ()))
        self.config = _read_config(self.pre.path / CONFIG)
        linears = linear_layers(self.pre.path)
        self.layers_from = "transformers" if linears is not None else "2-D weights"
        self.dense_specs = output_specs(merge)
        self.dtype = self._scale_dtype()
        self.targets = [n for n, s in self.dense_specs.items() if self._packs(n, s, linears)]
        if not self.targets:
            raise TvqError(
                f"{self.pre.path}: no Linear weight to quantize "
                f"(ignored: {', '.join(self.globs)}; group size {self.scheme.group_size})"
            )
        packed = {_module(n) for n in self.targets}
        candidates = linears if linears is not None else self._two_d_modules()
        self.ignore = sorted(candidates - packed)
        self.specs = self._specs()

    def _scale_dtype(self) -> torch.dtype:
        floats = {s.dtype for s in self.dense_specs.values() if s.is_float}
        if len(floats) != 1:
            raise TvqError(
                f"{self.pre.path}: float tensors of several dtypes ({sorted(floats)}): "
                "give --dtype for the packed model"
            )
        return to_torch(floats.pop())

    def _packs(self, name: str, spec: TensorSpec, linears: set[str] | None) -> bool:
        if not (spec.is_float and name.endswith(".weight") and len(spec.shape) == 2):
            return False
        module = _module(name)
        if linears is not None and module not in linears:
            return False
        if any(fnmatch.fnmatchcase(module, glob) for glob in self.globs):
            return False
        return self.scheme.fits(spec.shape)

    def _two_d_modules(self) -> set[str]:
        return {
            _module(n)
            for n, s in self.dense_specs.items()
            if s.is_float and n.endswith(".weight") and len(s.shape) == 2
        }

    def _specs(self) -> dict[str, TensorSpec]:
        """Every stored tensor, in the pretrained model's order."""
        targets, scheme, dtype = set(self.targets), self.scheme, from_torch(self.dtype)
        specs: dict[str, TensorSpec] = {}
        for name, spec in self.dense_specs.items():
            if name not in targets:
                specs[name] = spec
                continue
            module, (out, cols) = _module(name), spec.shape
            groups = scheme.groups(cols)
            specs[f"{module}.weight_packed"] = TensorSpec((out, scheme.packed_words(cols)), "I32")
            specs[f"{module}.weight_scale"] = TensorSpec((out, groups), dtype)
            specs[f"{module}.weight_shape"] = TensorSpec((2,), "I64")
            if not scheme.symmetric:
                zero_shape = (scheme.packed_words(out), groups)
                specs[f"{module}.weight_zero_point"] = TensorSpec(zero_shape, "I32")
        return specs

    def write(self, engine: Engine) -> tuple[dict, dict]:
        """Merge, quantize and write every tensor; returns the output and rounding reports."""
        merge, out = self.merge, self.merge.out
        tally = RoundingTally(len(merge.sources.refs))
        dtype = OUTPUT_DTYPES[merge.request.dtype] if merge.request.dtype else None
        with atomic_output(out, folder=True, replace=merge.request.force) as staged:
            writer = ModelWriter(
                staged,
                self.specs,
                folder=True,
                max_shard_bytes=merge.max_shard,
                copy_from=self.pre.path,
                dtype=dtype,
            )
            try:
                self._stream(writer, engine, tally)
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            self._write_config(staged)
        files = [out / f.relative_to(staged) for f in writer.files]
        output = {
            "path": str(out),
            "format": "compressed-tensors",
            "files": [str(f) for f in files],
            "bytes": sum(f.stat().st_size for f in files),
            "dtype": merge.request.dtype or "as pretrained",
            "targets": merge.target_names if merge.method.per_task else None,
            "quantization": {
                "scheme": merge.request.quantize,
                "bits": self.scheme.bits,
                "group_size": self.scheme.group_size,
                "strategy": self.scheme.strategy,
                "symmetric": self.scheme.symmetric,
                "packed": len(self.targets),
                "ignore": self.ignore,
                "layers_from": self.layers_from,
            },
        }
        rounding = {
            **tally.report(self.rounding),
            "grid": "weights",
            "tie_tolerance": self.rounding.tolerance,
        }
        return output, rounding

    def _stream(self, writer: ModelWriter, engine: Engine, tally: RoundingTally) -> None:
        targets = set(self.targets)
        stream = engine.tensors("merge")
        for name, spec in self.dense_specs.items():
            if not spec.is_float:
                writer.write(name, self.pre.load(name))
                continue
            got, base, taus = next(stream)
            if got != name:
                raise InternalError(f"merged {got}, expected {name}")
            if base is None:
                base = self.pre.load_float(name)
            merged = first_output(self.merge.method, name)(taus)
            if name not in targets:
                writer.write(name, (base + merged).to(to_torch(spec.dtype)))
                continue
            module = _module(name)
            for suffix, tensor in self._packed(name, base, taus, merged, tally):
                writer.write(f"{module}.{suffix}", tensor)

    def _packed(
        self,
        name: str,
        base: torch.Tensor,
        taus: torch.Tensor,
        merged: torch.Tensor,
        tally: RoundingTally,
    ) -> list[tuple[str, torch.Tensor]]:
        """One Linear weight's stored tensors, its codes chosen by the rounding rule."""
        scheme, shape = self.scheme, tuple(base.shape)
        step, zero = packed_int.weight_grid(base + merged, scheme, self.dtype)
        grid = StepGrid(
            packed_int.per_element(step.to(torch.float32), shape, scheme),
            packed_int.per_element(zero, shape, scheme),
            scheme.qmin,
            scheme.qmax,
            base,
        )
        tensor = MergedTensor(
            merged, taus, self.merge.sources.steps(name), first_output(self.merge.method, name)
        )
        generator = derive_generator(self.rounding.seed, name, "rounding")
        ambiguous = grid.ambiguous(merged, self.rounding.tolerance)
        rounded = round_on_grid(tensor, grid, ambiguous, self.rounding, generator)
        tally.add(name, rounded)
        stored = [
            ("weight_packed", packed_int.pack_codes(rounded.codes, scheme)),
            ("weight_scale", step),
            ("weight_shape", torch.tensor(shape, dtype=torch.int64)),
        ]
        if not scheme.symmetric:
            stored.append(("weight_zero_point", packed_int.pack_zero_points(zero, scheme)))
        return stored

    def _write_config(self, folder: Path) -> None:
        """The copied config.json (its dtype already set to --dtype's) plus the packing."""
        block = quantization_config(self.scheme, self.ignore)
        config = {**_read_config(folder / CONFIG), "quantization_config": block}
        (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise TvqError(f"{path.parent}: has no {CONFIG}, which a packed output needs")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TvqError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise TvqError(f"{path}: does not hold a JSON object")
    return config


def _module(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")
