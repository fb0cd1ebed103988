"""Bit allocation under a budget: bits (and group size) per tensor and role, least error.

`tvq pack --budget R` asks for an archive of at most R bits per weight, every byte counted.
First pass: for every quantized tensor, each candidate setting is applied to the tensor's real
task vectors, and its exact stored size (from `format.part_layout`, entropy-coded sizes
measured) and squared reconstruction error are recorded. Then a greedy walk along each
tensor's lower convex hull of (bytes, error) takes the steps with the most error removed per
byte until the budget is spent, fills what is left with any step that still fits, and is never
worse than the best uniform setting that fits. Items: one per (tensor, role) for schemes whose
roles are independent (TVQ, FQ); one per tensor for coupled schemes (RTVQ), whose options are
(shared-role bits, task-role bits) pairs, so the split between base and offsets is measured
rather than guessed. Candidates are coded through the scheme's own `encode` and `decode`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from itertools import product

import torch

from ..archive import schemes
from ..archive.format import ArchiveHeader, Part, TensorEntry, layout, part_layout
from ..archive.writer import archive_size, reserved_header_length
from ..errors import InternalError, TvqError, UsageError
from ..io.checkpoint import Checkpoint
from ..quant import entropy
from ..quant.quantizer import dequantize, quantize
from ..quant.spec import Quantized
from .options import WEIGHTINGS

BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # independent roles
COUPLED_BITS = (1, 2, 3, 4, 5, 6)  # each role of a coupled scheme (RTVQ base and offsets)


@dataclass
class Option:
    parts: list[Part]  # with exact coded sizes
    nbytes: int
    error: float  # weighted squared error of the reconstructed task vectors


@dataclass
class Item:
    entry: int  # index into header.tensors
    slots: list[int]  # which of the entry's parts this item decides
    options: list[Option]


@dataclass
class Coded:
    """One role coded with one setting."""

    part: Part  # with its coded size
    nbytes: int
    q: Quantized

    def dequantized(self, entry: TensorEntry) -> torch.Tensor:
        return dequantize(self.q, self.part.spec, entry.shape)


@dataclass
class Allocation:
    """What the allocator chose and what it expects."""

    budget_bytes: int
    size_bytes: int
    rel_error: float  # predicted rel-L2 over all task vectors (weighting "params")
    uniform_error: float | None  # the best uniform setting's, for comparison (None: none fits)


def _sized(part: Part, entry: TensorEntry, q: Quantized) -> tuple[Part, int]:
    """The part with its coded size filled in, and its stored bytes."""
    if part.codec == "zstd":
        part = replace(part, coded_nbytes=len(entropy.encode(q.codes.numpy(), part.bits)))
    return part, sum(s.nbytes for s in part_layout(part, entry))


def _sq_error(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(x_hat.sub_(x).double().square().sum())


def _role_values(
    scheme: schemes.Scheme, taus: list[torch.Tensor], pre: torch.Tensor
) -> list[torch.Tensor]:
    """What each role of an independent scheme quantizes (task vectors, or fine-tuned weights)."""
    inputs = [t.clone() if scheme.subtracts_pretrained else t + pre for t in taus]
    values: list[torch.Tensor] = []
    scheme.encode(inputs, lambda index, v, reconstruct=False: values.append(v), False)
    return values


def _independent_items(
    entry: TensorEntry,
    index: int,
    scheme: schemes.Scheme,
    taus: list[torch.Tensor],
    pre: torch.Tensor,
    groups: tuple[int, ...],
    weight: float,
) -> list[Item]:
    """One item per role: its bits and group size chosen on their own."""
    items = []
    for slot, x in enumerate(_role_values(scheme, taus, pre)):
        options = []
        for bits, group in product(BITS, groups):
            part = replace(entry.parts[slot], bits=bits, group_size=group)
            q = quantize(x, part.spec)
            part, nbytes = _sized(part, entry, q)
            err = _sq_error(dequantize(q, part.spec, entry.shape), x)
            options.append(Option([part], nbytes, weight * err))
        items.append(Item(index, [slot], options))
    return items


def _coupled_item(
    entry: TensorEntry,
    index: int,
    scheme: schemes.Scheme,
    tasks: list[str],
    taus: list[torch.Tensor],
    error_correction: bool,
    groups: tuple[int, ...],
    weight: float,
) -> Item:
    """One item for the whole tensor: every (shared bits, group, task bits) setting, each
    coded and decoded through the scheme, its error summed over the tasks."""
    options = []
    for shared_bits, group in product(COUPLED_BITS, groups):
        kept: dict[int, Coded] = {}  # shared roles: the same for every task-role setting
        for task_bits in COUPLED_BITS:
            setting = (shared_bits, task_bits, group)
            coded = _code_coupled(entry, scheme, taus, error_correction, setting, kept)
            by_role = dict(zip(scheme.roles(tasks), coded, strict=True))

            def dequantized(role: str, by_role=by_role) -> torch.Tensor:
                return by_role[role].dequantized(entry)

            err = sum(
                _sq_error(scheme.decode(task, dequantized, None), tau)
                for task, tau in zip(tasks, taus, strict=True)
            )
            parts = [c.part for c in coded]
            options.append(Option(parts, sum(c.nbytes for c in coded), weight * err))
    return Item(index, list(range(len(entry.parts))), options)


def _code_coupled(
    entry: TensorEntry,
    scheme: schemes.Scheme,
    taus: list[torch.Tensor],
    error_correction: bool,
    setting: tuple[int, int, int],
    kept: dict[int, Coded],
) -> list[Coded]:
    """Every role coded with (shared bits, task bits, group); shared roles come from `kept`
    when coded before, and are added to it otherwise."""
    shared_bits, task_bits, group = setting
    shared = len(scheme.shared_roles)
    coded: dict[int, Coded] = {}

    def code(slot: int, values: torch.Tensor, reconstruct: bool = False) -> torch.Tensor | None:
        if slot in kept:
            coded[slot] = kept[slot]
        else:
            bits = shared_bits if slot < shared else task_bits
            part = replace(entry.parts[slot], bits=bits, group_size=group)
            q = quantize(values, part.spec)
            coded[slot] = Coded(*_sized(part, entry, q), q)
            if slot < shared:
                kept[slot] = coded[slot]
        return coded[slot].dequantized(entry) if reconstruct else None

    scheme.encode([t.clone() for t in taus], code, error_correction)
    return [coded[slot] for slot in range(len(coded))]


def _measure_entry(
    entry: TensorEntry,
    index: int,
    pre: torch.Tensor,
    finetuned: list[Checkpoint],
    header: ArchiveHeader,
    groups: tuple[int, ...],
    weighting: str,
) -> tuple[list[Item], float]:
    """The items of one quantized tensor and its task vectors' total squared norm."""
    # not in place: a loaded tensor may share memory with the checkpoint's open handle
    taus = [ckpt.load_float(entry.name) - pre for ckpt in finetuned]
    norm2 = sum(float(t.double().square().sum()) for t in taus)
    weight = 1.0 if weighting == "params" else 1.0 / max(norm2, 1e-30)
    scheme = schemes.get(header.scheme)
    if not scheme.coupled:
        return _independent_items(entry, index, scheme, taus, pre, groups, weight), norm2
    ec = bool(header.error_correction)
    return [_coupled_item(entry, index, scheme, header.tasks, taus, ec, groups, weight)], norm2


def _hull(options: list[Option]) -> list[int]:
    """Indices of the lower convex hull of (bytes, error), from the smallest option up."""
    order = sorted(range(len(options)), key=lambda i: (options[i].nbytes, options[i].error))
    hull: list[int] = []
    for i in order:
        if hull and options[i].error >= options[hull[-1]].error:
            continue
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            c = options[i]
            # drop b if it lies on or above the segment a-c
            if (b.error - a.error) * (c.nbytes - a.nbytes) >= (c.error - a.error) * (
                b.nbytes - a.nbytes
            ):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def choose(items: list[Item], available: int) -> list[int]:
    """Option index per item: least total error with total bytes <= `available`."""
    hulls = [_hull(item.options) for item in items]
    pos = [0] * len(items)
    pick = [h[0] for h in hulls]
    total = sum(items[k].options[p].nbytes for k, p in enumerate(pick))
    if total > available:
        raise TvqError("budget is below the smallest archive these settings can make")
    heap: list[tuple[float, int, int]] = []

    def push(k: int) -> None:
        if pos[k] + 1 < len(hulls[k]):
            cur, nxt = items[k].options[hulls[k][pos[k]]], items[k].options[hulls[k][pos[k] + 1]]
            gain = (cur.error - nxt.error) / max(nxt.nbytes - cur.nbytes, 1)
            heapq.heappush(heap, (-gain, k, pos[k]))

    for k in range(len(items)):
        push(k)
    while heap:
        _, k, at = heapq.heappop(heap)
        if at != pos[k]:
            continue
        nxt = items[k].options[hulls[k][pos[k] + 1]]
        extra = nxt.nbytes - items[k].options[pick[k]].nbytes
        if total + extra > available:
            continue  # this item's next step does not fit; others' may
        total += extra
        pos[k] += 1
        pick[k] = hulls[k][pos[k]]
        push(k)
    return _fill(items, pick, available - total)


def _fill(items: list[Item], pick: list[int], left: int) -> list[int]:
    """Spend what the hull walk left on any single upgrade that fits, best gain per byte first."""
    while True:
        best = None
        for k, item in enumerate(items):
            cur = item.options[pick[k]]
            for j, opt in enumerate(item.options):
                extra = opt.nbytes - cur.nbytes
                if opt.error < cur.error and extra <= left:
                    gain = (cur.error - opt.error) / max(extra, 1)
                    if best is None or gain > best[0]:
                        best = (gain, k, j, extra)
        if best is None:
            return pick
        _, k, j, extra = best
        pick[k] = j
        left -= extra


def _uniform(items: list[Item], available: int) -> tuple[list[int] | None, float | None]:
    """The best setting shared by every item (same option index everywhere) that fits."""
    count = min(len(item.options) for item in items)
    best: tuple[float, int] | None = None
    for j in range(count):
        if sum(item.options[j].nbytes for item in items) <= available:
            err = sum(item.options[j].error for item in items)
            if best is None or err < best[0]:
                best = (err, j)
    if best is None:
        return None, None
    return [best[1]] * len(items), best[0]


def _apply(header: ArchiveHeader, items: list[Item], pick: list[int]) -> None:
    for item, j in zip(items, pick, strict=True):
        entry = header.tensors[item.entry]
        parts = list(entry.parts)
        for slot, part in zip(item.slots, item.options[j].parts, strict=True):
            parts[slot] = part
        entry.parts = parts


def allocate(
    header: ArchiveHeader,
    pretrained: Checkpoint,
    finetuned: list[Checkpoint],
    budget_bpw: float,
    weighting: str = "params",
    groups: tuple[int, ...] = (),
) -> Allocation:
    """Set every quantized tensor's parts in `header` to fit `budget_bpw`; least error."""
    if weighting not in WEIGHTINGS:
        raise UsageError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if not budget_bpw > 0:
        raise UsageError(f"budget must be a positive number of bits per weight, got {budget_bpw}")
    budget = header.budget_bytes(budget_bpw)
    items: list[Item] = []
    norm2 = 0.0
    for index, entry in enumerate(header.tensors):
        if entry.kind != "quantized":
            continue
        pre = pretrained.load_float(entry.name)
        grid = groups or (entry.parts[0].group_size,)
        new, n2 = _measure_entry(entry, index, pre, finetuned, header, grid, weighting)
        items.extend(new)
        norm2 += n2
    if not items:
        size = archive_size(header)
        if size > budget:
            raise UsageError(f"budget {budget_bpw} bpw is below the archive's {_bpw(header, size)}")
        return Allocation(budget, size, 0.0, None)
    _apply(
        header,
        items,
        [max(range(len(i.options)), key=lambda j, i=i: i.options[j].nbytes) for i in items],
    )
    fixed = reserved_header_length(header) + _unquantized_bytes(header)
    available = budget - fixed
    smallest = sum(min(o.nbytes for o in item.options) for item in items)
    if smallest > available:
        raise UsageError(
            f"budget {budget_bpw} bits per weight is too small: these settings need at least "
            f"{header.bits_per_weight(smallest + fixed):.3f}"
        )
    pick, size, uniform_err = _fit(header, items, available, budget)
    err = sum(item.options[j].error for item, j in zip(items, pick, strict=True))
    rel = (err / norm2) ** 0.5 if weighting == "params" and norm2 > 0 else float("nan")
    uni_rel = (
        (uniform_err / norm2) ** 0.5
        if uniform_err is not None and weighting == "params" and norm2 > 0
        else None
    )
    return Allocation(budget, size, rel, uni_rel)


def _fit(
    header: ArchiveHeader, items: list[Item], available: int, budget: int
) -> tuple[list[int], int, float | None]:
    """The least-error choice whose whole archive fits `budget`: (pick, size, uniform error).

    The header's own length moves a little with the choice (coded sizes are written in it),
    so `available` is corrected by what the real size over- or undershoots, a few times; the
    best fitting choice is kept. Spending the undershoot matters at a budget equal to a
    uniform archive's size: that archive must stay reachable.
    """
    best: tuple[float, list[int], int, float | None] | None = None
    for _ in range(6):
        pick = choose(items, available)
        uniform_pick, uniform_err = _uniform(items, available)
        chosen_err = _total(items, pick)
        if uniform_err is not None and uniform_err < chosen_err:
            pick, chosen_err = uniform_pick, uniform_err
        _apply(header, items, pick)
        size = archive_size(header)
        if size <= budget and (best is None or chosen_err < best[0]):
            best = (chosen_err, pick, size, uniform_err)
        if size == budget:
            break
        available += budget - size
    if best is None:
        raise InternalError("allocation exceeds the budget")
    _, pick, size, uniform_err = best
    _apply(header, items, pick)
    return pick, size, uniform_err


def _total(items: list[Item], pick: list[int]) -> float:
    return sum(item.options[j].error for item, j in zip(items, pick, strict=True))


def _unquantized_bytes(header: ArchiveHeader) -> int:
    """Payload bytes of the exact and shared tensors (fixed whatever the allocation)."""
    stored = layout(replace(header, tensors=[t for t in header.tensors if t.kind != "quantized"]))
    return sum(s.nbytes for s in stored)


def _bpw(header: ArchiveHeader, size: int) -> str:
    return f"{header.bits_per_weight(size):.3f} bpw"
