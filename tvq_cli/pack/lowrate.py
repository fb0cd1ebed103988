"""The allocator's low-rate options: what each `dzans` setting of a role costs and leaves.

Independent roles (TVQ, FQ): every candidate setting of the role's values, measured exactly
from one sort (`dzans.measure`), reduced to its lower convex hull of (bytes, error). Coupled
roles (RTVQ with error correction): a few base settings, none among them (plain TVQ); for each,
the base is coded, every offset taken against its reconstruction and measured, and the offsets'
hulls summed (a sum of independent convex hulls is their segments merged by slope), so one
option is a whole assignment: base setting plus every task's offset setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..archive.format import Part, TensorEntry
from ..archive.schemes import Scheme
from ..quant import dzans

BASE_STEPS = (-12, -8, -4, 0, 4)  # RTVQ base settings tried, quarter octaves from its RMS


@dataclass
class Option:
    """One way to store an item's roles: parts, bytes, weighted squared error."""

    parts: list[Part]  # with exact coded sizes (dense) or their record's bound (low-rate)
    nbytes: int  # payload plus the header's entries for it (estimated)
    error: float  # what the allocator minimizes
    final_error: float | None = None  # the task vectors' real error, when it differs (gain)
    records: list[int] = field(default_factory=list)  # per part: its record's bound (0: dense)

    @property
    def reported(self) -> float:
        return self.error if self.final_error is None else self.final_error


def hull(options: list[Option]) -> list[int]:
    """Indices of the lower convex hull of (bytes, error), from the smallest option up."""
    order = sorted(range(len(options)), key=lambda i: (options[i].nbytes, options[i].error))
    out: list[int] = []
    for i in order:
        if out and options[i].error >= options[out[-1]].error:
            continue
        while len(out) >= 2:
            a, b, c = options[out[-2]], options[out[-1]], options[i]
            # drop b if it lies on or above the segment a-c
            if (b.error - a.error) * (c.nbytes - a.nbytes) >= (c.error - a.error) * (
                b.nbytes - a.nbytes
            ):
                out.pop()
            else:
                break
        out.append(i)
    return out


def record_cost(entry: TensorEntry, nbytes: int) -> int:
    """Bytes a low-rate record adds to the archive: itself, and unless it is in a frame, its
    stored tensor's header entry and checksum (about 150 bytes: key twice, offsets, crc)."""
    return nbytes if entry.framed else nbytes + 150 + 2 * len(entry.name)


def role_options(
    entry: TensorEntry, role: str, values: torch.Tensor, weight: float
) -> list[Option]:
    """The hull of one independent role's low-rate settings."""
    measured = dzans.measure(values.reshape(-1).numpy(), entry.rows)
    options = [_option(entry, role, m, weight) for m in measured]
    return [options[i] for i in hull(options)]


def _option(entry: TensorEntry, role: str, m: dzans.Measured, weight: float) -> Option:
    part = Part.low_rate(role, m.setting, 0 if entry.framed else m.nbytes)
    return Option(
        [part],
        record_cost(entry, m.nbytes),
        weight * m.sq_error,
        weight * m.final_error,
        [m.nbytes],
    )


def coupled_options(
    entry: TensorEntry,
    scheme: Scheme,
    roles: list[str],
    taus: list[torch.Tensor],
    weight: float,
) -> list[Option]:
    """A coupled scheme with error correction (RTVQ): for each setting of its shared role (the
    base), that record plus the sum of the task roles' hulls, each task role's values taken
    through the scheme's own `encode` (so they are what pack will code). `roles`: storage
    order, the shared role first."""
    out: list[Option] = []
    for setting in _base_settings(scheme, taus):
        values: list[torch.Tensor] = []
        base: list[dzans.Encoded] = []

        def code(index, x, reconstruct=False, setting=setting, values=values, base=base):
            if index > 0:
                values.append(x)
                return None
            base.append(dzans.encode(x.reshape(-1).numpy(), entry.rows, setting, True))
            return torch.from_numpy(base[0].values).reshape(x.shape)

        scheme.encode([t.clone() for t in taus], code, True)
        hulls = [role_options(entry, r, v, weight) for r, v in zip(roles[1:], values, strict=True)]
        record = len(base[0].record)
        base_part = Part.low_rate(roles[0], setting, 0 if entry.framed else record)
        for picks in _summed(hulls):
            chosen = [h[i] for h, i in zip(hulls, picks, strict=True)]
            out.append(
                Option(
                    [base_part, *(o.parts[0] for o in chosen)],
                    record_cost(entry, record) + sum(o.nbytes for o in chosen),
                    sum(o.error for o in chosen),
                    sum(o.reported for o in chosen),
                    [record, *(o.records[0] for o in chosen)],
                )
            )
    return out


def _base_settings(scheme: Scheme, taus: list[torch.Tensor]) -> list[dzans.Setting]:
    """None (plain TVQ: a zero base), and steps around the task vectors' mean's RMS (only
    where to look: the base itself is what the scheme's `encode` computes)."""
    mean = torch.stack([t.double() for t in taus]).mean(0)
    rms = math.sqrt(float((mean * mean).mean())) if mean.numel() else 0.0
    if rms == 0:
        return [dzans.ZERO]
    j0 = round(4 * math.log2(rms))
    steps = [j0 + d for d in BASE_STEPS if 1 <= j0 + d + dzans.J_OFFSET <= 255]
    return [dzans.ZERO, *(dzans.Setting(j) for j in steps)]


def _summed(hulls: list[list[Option]]) -> list[list[int]]:
    """The points of the sum of convex hulls (each from its smallest option up): start at
    every hull's first point, then take the hulls' steps in order of error saved per byte."""
    steps = [
        (
            (h[i + 1].error - h[i].error) / max(h[i + 1].nbytes - h[i].nbytes, 1),
            k,
        )
        for k, h in enumerate(hulls)
        for i in range(len(h) - 1)
    ]
    steps.sort()
    picks = [0] * len(hulls)
    points = [list(picks)]
    for _, k in steps:
        picks[k] += 1
        points.append(list(picks))
    return points
