"""Tensor names across checkpoints of one model that were saved differently.

A fine-tune saved from the base class has `layers.0...` where the pretrained checkpoint has
`model.layers.0...`; the state dict of a PEFT wrapper has `base_model.model.` in front of every
name. `find_renaming` finds the one prefix change that maps the most names of a fine-tune onto
the pretrained names; the caller decides whether what is left unmatched is acceptable.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

EXAMPLES = 3  # names shown in an error about names


@dataclass(frozen=True)
class Renaming:
    """Remove `strip` from the front of a name, then put `add` there."""

    strip: str = ""
    add: str = ""

    def __call__(self, name: str) -> str:
        return self.add + name.removeprefix(self.strip)

    def __bool__(self) -> bool:
        return bool(self.strip or self.add)

    def describe(self) -> str:
        steps = []
        if self.strip:
            steps.append(f"removed the prefix {self.strip!r}")
        if self.add:
            steps.append(f"added the prefix {self.add!r}")
        return " and ".join(steps) or "names as they are"


def _dotted_prefixes(name: str, depth: int) -> list[str]:
    """'a.', 'a.b.', ... of a dotted name, at most `depth` of them (never the whole name)."""
    parts = name.split(".")[:-1]
    return [".".join(parts[: i + 1]) + "." for i in range(min(depth, len(parts)))]


def find_renaming(names: Iterable[str], target: Collection[str]) -> Renaming:
    """The prefix change under which the most of `names` are `target` names; of equals, the
    shortest (no change first). Prefixes removed are those of one or two parts every name
    starts with; prefixes added are the first one or two parts of a target name."""
    names = list(names)
    if not names or all(n in target for n in names):
        return Renaming()
    # at most two parts removed: a wrapper's prefix, not a coincidence between a few names
    strips = [p for p in _dotted_prefixes(names[0], 2) if all(n.startswith(p) for n in names)]
    adds = {p for t in target for p in _dotted_prefixes(t, 2)}
    candidates = sorted(
        {Renaming(s, a) for s in ["", *strips] for a in ["", *adds]},
        key=lambda r: (len(r.strip) + len(r.add), r.strip, r.add),
    )
    best, best_score = Renaming(), -1
    for renaming in candidates:
        score = sum(renaming(n) in target for n in names)
        if score > best_score:
            best, best_score = renaming, score
    return best


def examples(names: Iterable[str], limit: int = EXAMPLES) -> str:
    """A few names for an error message: 'a', 'b', 'c' and 12 more."""
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return shown + (f" and {more} more" if more > 0 else "")
