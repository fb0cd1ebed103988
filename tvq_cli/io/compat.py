"""Whether a fine-tuned checkpoint fits its pretrained one, and how its tensors map onto it.

What is accepted, and why (docs/cli.md, "Inputs"):
- names that differ by one consistent prefix (a fine-tune saved from the base class, or a
  PEFT wrapper's `base_model.model.`): mapped, and said so;
- a tensor the pretrained checkpoint lacks that is an exact copy of one it has (a tied
  `lm_head.weight` written out explicitly): recorded as a copy, stored once;
- pretrained tensors outside the prefix a fine-tune saved from the base class lacks (its head):
  absent, their task vector is zero;
- a non-float buffer the fine-tune did not save: the pretrained one (they must be equal anyway);
- any float dtype of fp32, fp16, bf16 in any mix (task vectors are fp32);
- a float tensor grown along its first dimension (an embedding or head for added tokens): the
  shared rows are a task vector, the added rows are kept as they are.
Everything else is an error that says how many names or tensors differ, with a few examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..dtypes import INPUT_FLOATS
from ..errors import TvqError
from .checkpoint import Checkpoint, TensorSpec
from .names import Renaming, examples, find_renaming


@dataclass
class Match:
    """How one fine-tune's tensors map onto the pretrained names."""

    renamed: Renaming
    own: dict[str, str]  # pretrained name -> the fine-tune's name for it
    specs: dict[str, TensorSpec]  # pretrained name -> the fine-tune's shape and dtype
    rows: dict[str, int] = field(default_factory=dict)  # rows added past the pretrained's
    copies: dict[str, str] = field(default_factory=dict)  # copy (pretrained naming) -> original
    absent: list[str] = field(default_factory=list)  # float tensors it lacks: tau = 0
    buffers: list[str] = field(default_factory=list)  # non-float tensors it lacks: pretrained's

    def notes(self, where: object) -> list[str]:
        """What was mapped or assumed, for people (printed on stderr)."""
        notes = []
        if self.renamed:
            notes.append(f"{where}: tensor names {self.renamed.describe()} to match the pretrained")
        for copy, original in self.copies.items():
            notes.append(f"{where}: {copy} is a copy of {original} (tied), stored once")
        if self.absent:
            notes.append(
                f"{where}: has no {examples(self.absent)} (saved without the model's head?): "
                "taken as not fine-tuned (task vector 0)"
            )
        return notes


def check_pretrained(pretrained: Checkpoint) -> None:
    """Float tensors of the pretrained checkpoint in fp32, fp16 or bf16."""
    for name, spec in pretrained.specs.items():
        if spec.is_float and spec.dtype not in INPUT_FLOATS:
            raise TvqError(
                f"{pretrained.path}: tensor {name} has dtype {spec.dtype}; "
                "float tensors must be F32, F16 or BF16"
            )


def grown_rows(spec: TensorSpec, base: TensorSpec) -> int | None:
    """Rows `spec` adds past `base` along the first dimension (0 if the same shape); None if
    the shapes differ otherwise."""
    if spec.shape == base.shape:
        return 0
    if base.is_float and spec.shape[1:] == base.shape[1:] and spec.shape[:1] > base.shape[:1]:
        return spec.shape[0] - base.shape[0]
    return None


def check_tensor(where: object, name: str, spec: TensorSpec, base: TensorSpec) -> int:
    """The rows a fine-tune's tensor adds; an error where shape or dtype cannot fit."""
    rows = grown_rows(spec, base)
    if rows is None:
        raise TvqError(
            f"{where}: tensor {name} has shape {list(spec.shape)}, pretrained has "
            f"{list(base.shape)} (only rows added along the first dimension can be stored)"
        )
    if base.is_float:
        if spec.dtype not in INPUT_FLOATS:
            raise TvqError(
                f"{where}: tensor {name} has dtype {spec.dtype}; "
                "float tensors must be F32, F16 or BF16"
            )
    elif spec.dtype != base.dtype:
        raise TvqError(
            f"{where}: tensor {name} has dtype {spec.dtype}, pretrained has {base.dtype}"
        )
    return rows


def match_checkpoint(
    pretrained: Checkpoint,
    finetuned: Checkpoint,
    same: Callable[[str, str], bool],
) -> Match:
    """Map a fine-tune onto the pretrained names (`same(a, b)`: whether the fine-tune's tensors
    a and b are equal, for tied copies). Raises TvqError when they do not fit."""
    where = finetuned.path
    base = pretrained.specs
    renamed = find_renaming(finetuned.names, base)
    own = {renamed(n): n for n in finetuned.names}
    specs = {name: finetuned.specs[n] for name, n in own.items()}
    match = Match(renamed, {n: o for n, o in own.items() if n in base}, {})
    unknown = []
    for name in own:
        if name not in base:
            original = _copied(name, own, specs, base, same)
            if original is None:
                unknown.append(name)
            else:
                match.copies[name] = original
    lacking = [n for n in base if n not in own]
    match.buffers = [n for n in lacking if not base[n].is_float]
    if renamed.add:  # saved from the base class: what lies outside it (the head) is absent
        match.absent = [n for n in lacking if base[n].is_float and not n.startswith(renamed.add)]
    missing = [n for n in lacking if n not in match.buffers and n not in match.absent]
    if unknown or missing:
        raise TvqError(_mismatch(where, renamed, unknown, missing, finetuned, specs, base))
    for name, original_name in match.own.items():
        rows = check_tensor(where, original_name, specs[name], base[name])
        if rows:
            match.rows[name] = rows
    match.specs = {n: specs[n] if n in match.own else base[n] for n in base}
    return match


def _copied(
    name: str,
    own: dict[str, str],
    specs: dict[str, TensorSpec],
    base: dict[str, TensorSpec],
    same: Callable[[str, str], bool],
) -> str | None:
    """The pretrained tensor that `name` (not a pretrained name) is an exact copy of, if any."""
    spec = specs[name]
    for other, other_spec in specs.items():
        if other in base and other_spec == spec and same(own[name], own[other]):
            return other
    return None


def _mismatch(where, renamed, unknown, missing, finetuned, specs, base) -> str:
    """One error line for names that do not fit: how many, a few examples, what was tried."""
    untied = [n for n in unknown if any(s == specs[n] for s in base.values())]
    hint = (
        " (a tensor the pretrained model ties to another but trained on its own, e.g. an "
        "untied lm_head, cannot be stored)"
        if untied and len(unknown) <= 2 and not missing
        else ""
    )
    if len(unknown) == 1 and not missing:
        text = f"tensor {unknown[0]} is not in the pretrained checkpoint{hint}"
    elif len(missing) == 1 and not unknown:
        text = f"tensor {missing[0]} is missing (present in pretrained)"
    else:
        parts = []
        if unknown:
            parts.append(
                f"{len(unknown)} of its {len(finetuned.names)} tensors are not in the pretrained "
                f"checkpoint ({examples(unknown)}){hint}"
            )
        if missing:
            parts.append(
                f"{len(missing)} of the pretrained's {len(base)} tensors are missing from it "
                f"({examples(missing)})"
            )
        text = " and ".join(parts)
        if unknown and missing and not renamed:
            text += "; no consistent prefix difference maps one set of names onto the other"
    if renamed:
        text += f" (after its names were mapped: {renamed.describe()})"
    return f"{where}: {text}"
