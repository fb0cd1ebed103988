"""Allocation under a budget: a setting per tensor and role, for the least error.

`tvq pack --budget R` asks for an archive of at most R bits per weight, every byte counted.
First pass: for every quantized tensor (and, under a budget, every 1-D float tensor), each
candidate setting is applied to the tensor's real task vectors, and its stored size and squared
reconstruction error are recorded: dense widths (1-8 bits, each group size asked for; sizes
exact, entropy-coded ones measured) and low-rate `dzans` settings (`lowrate.py`; sizes are
upper bounds of their records, exact within a few bytes). Each option's size includes the header
entries it adds, so a small tensor's dense part (four stored tensors) is weighed against a
framed record fairly. Then a greedy walk along each item's lower convex hull of (bytes, error)
takes the steps with the most error removed per byte until the budget is spent, fills what is
left with any step that still fits, and is never worse than the best uniform dense setting that
fits. Items: one per (tensor, role) for schemes whose roles are independent (TVQ, FQ); one per
tensor for coupled schemes (RTVQ), whose options are (shared-role bits, task-role bits) pairs
and low-rate base settings with the offsets' hulls, so the split between base and offsets is
measured rather than guessed. Candidates are coded through the scheme's own `encode` and
`decode`. Since sizes are exact or upper bounds, the archive written never exceeds the budget.
"""

from __future__ import annotations

import heapq
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from itertools import product

import torch
from tqdm import tqdm

from ..archive import schemes
from ..archive.format import ArchiveHeader, Part, TensorEntry, layout, part_layout
from ..archive.parts import stored_codes
from ..archive.writer import archive_size
from ..errors import InternalError, TvqError, UsageError
from ..io.checkpoint import Checkpoint
from ..quant import sizes
from ..quant.quantizer import dequantize, quantize
from ..quant.sizes import DEFAULT_CODEC
from ..quant.spec import DEFAULT_GROUP_SIZE, DEFAULT_RANGE, DEFAULT_SCALE_BITS, Quantized
from . import lowrate
from .lowrate import Option
from .options import WEIGHTINGS

BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # independent roles
COUPLED_BITS = (1, 2, 3, 4, 5, 6)  # each role of a coupled scheme (RTVQ base and offsets)


@dataclass
class Item:
    entry: int  # index into header.tensors
    slots: list[int]  # which of the entry's parts this item decides
    options: list[Option]
    dense: int = 0  # its first options are the dense settings, in the same order in every item


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
    """The part with its coded size filled in, and the bytes it adds to the archive."""
    if part.codec in sizes.CODED:
        part = replace(part, coded_nbytes=len(stored_codes(part, entry.shape, q)))
    return part, sum(s.nbytes for s in part_layout(part, entry)) + header_cost(part, entry)


def header_cost(part: Part, entry: TensorEntry) -> int:
    """About what a dense part adds to the header: its JSON, and per stored tensor a
    safetensors entry (key, dtype, shape, offsets) and a checksum entry."""
    own = len(json.dumps(part.to_json(), separators=(",", ":"))) + 1
    return own + sum(2 * len(s.key) + 70 for s in part_layout(part, entry))


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
    model: Part,
) -> list[Item]:
    """One item per role: its setting chosen on its own. `model`: a dense part with the
    options the dense settings share (range, scale bits, codec)."""
    items = []
    for slot, x in enumerate(_role_values(scheme, taus, pre)):
        role = entry.parts[slot].role
        options = []
        for bits, group in product(BITS, groups) if len(entry.shape) > 1 else ():
            part = replace(model, role=role, bits=bits, group_size=group)
            q = quantize(x, part.spec)
            part, nbytes = _sized(part, entry, q)
            err = _sq_error(dequantize(q, part.spec, entry.shape), x)
            options.append(Option([part], nbytes, weight * err))
        dense = len(options)
        options += lowrate.role_options(entry, role, x, weight)
        items.append(Item(index, [slot], options, dense))
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
    model: Part,
) -> Item:
    """One item for the whole tensor: every (shared bits, group, task bits) setting, each
    coded and decoded through the scheme, its error summed over the tasks; with error
    correction, also the low-rate settings (`lowrate.coupled_options`)."""
    options = []
    dense_grid = product(COUPLED_BITS, groups) if len(entry.shape) > 1 else ()
    for shared_bits, group in dense_grid:
        kept: dict[int, Coded] = {}  # shared roles: the same for every task-role setting
        for task_bits in COUPLED_BITS:
            setting = (shared_bits, task_bits, group)
            coded = _code_coupled(entry, scheme, taus, error_correction, setting, kept, model)
            by_role = dict(zip(scheme.roles(tasks), coded, strict=True))

            def dequantized(role: str, by_role=by_role) -> torch.Tensor:
                return by_role[role].dequantized(entry)

            err = sum(
                _sq_error(scheme.decode(task, dequantized, None), tau)
                for task, tau in zip(tasks, taus, strict=True)
            )
            parts = [c.part for c in coded]
            options.append(Option(parts, sum(c.nbytes for c in coded), weight * err))
    dense = len(options)
    if error_correction:
        roles = [p.role for p in entry.parts]
        options += lowrate.coupled_options(entry, scheme, roles, taus, weight)
    return Item(index, list(range(len(entry.parts))), options, dense)


def _code_coupled(
    entry: TensorEntry,
    scheme: schemes.Scheme,
    taus: list[torch.Tensor],
    error_correction: bool,
    setting: tuple[int, int, int],
    kept: dict[int, Coded],
    model: Part,
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
            part = replace(model, role=entry.parts[slot].role, bits=bits, group_size=group)
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
    model: Part,
) -> tuple[list[Item], float]:
    """The items of one quantized tensor and its task vectors' total squared norm."""
    # not in place: a loaded tensor may share memory with the checkpoint's open handle
    taus = [ckpt.load_float(entry.name) - pre for ckpt in finetuned]
    norm2 = sum(float(t.double().square().sum()) for t in taus)
    weight = 1.0 if weighting == "params" else 1.0 / max(norm2, 1e-30)
    scheme = schemes.get(header.scheme)
    if not scheme.coupled:
        items = _independent_items(entry, index, scheme, taus, pre, groups, weight, model)
        return items, norm2
    ec = bool(header.error_correction)
    args = (entry, index, scheme, header.tasks, taus, ec, groups, weight, model)
    return [_coupled_item(*args)], norm2


def choose(items: list[Item], available: int) -> list[int]:
    """Option index per item: least total error with total bytes <= `available`."""
    hulls = [lowrate.hull(item.options) for item in items]
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


def _uniform(
    items: list[Item], available: int, pick: list[int]
) -> tuple[list[int] | None, float | None]:
    """The best dense setting shared by every item that has dense options (same option index
    everywhere; the others, 1-D tensors, as in `pick`) that fits."""
    dense = [item.dense for item in items if item.dense]
    best: tuple[float, list[int]] | None = None
    for j in range(min(dense, default=0)):
        candidate = [j if item.dense else p for item, p in zip(items, pick, strict=True)]
        if _size(items, candidate) <= available:
            err = _total(items, candidate)
            if best is None or err < best[0]:
                best = (err, candidate)
    if best is None:
        return None, None
    return best[1], best[0]


def _size(items: list[Item], pick: list[int]) -> int:
    return sum(item.options[j].nbytes for item, j in zip(items, pick, strict=True))


def _apply(header: ArchiveHeader, items: list[Item], pick: list[int]) -> None:
    """Set the picked options' parts, and each role's frame to its records' bound."""
    frames: dict[str, int] = defaultdict(int)
    for item, j in zip(items, pick, strict=True):
        entry = header.tensors[item.entry]
        option = item.options[j]
        parts = list(entry.parts)
        records = option.records or [0] * len(option.parts)
        for slot, part, record in zip(item.slots, option.parts, records, strict=True):
            parts[slot] = part
            if not part.dense and entry.framed:
                frames[part.role] += record
        entry.parts = parts
    header.frames = dict(frames)


def allocate(
    header: ArchiveHeader,
    pretrained: Checkpoint,
    finetuned: list[Checkpoint],
    budget_bpw: float,
    weighting: str = "params",
    groups: tuple[int, ...] = (),
    progress: bool = False,
) -> Allocation:
    """Set every quantized tensor's parts in `header` to fit `budget_bpw`; least error.
    Measuring every setting of every tensor is pack's longest stage under a budget (minutes
    for a model of tens of millions of weights), hence its own progress bar."""
    if weighting not in WEIGHTINGS:
        raise UsageError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if not budget_bpw > 0:
        raise UsageError(f"budget must be a positive number of bits per weight, got {budget_bpw}")
    budget = header.budget_bytes(budget_bpw)
    items: list[Item] = []
    norm2 = 0.0
    model = next((p for t in header.tensors for p in t.parts if p.dense), None)
    model = model or Part(
        "", 4, DEFAULT_GROUP_SIZE, DEFAULT_RANGE, DEFAULT_SCALE_BITS, DEFAULT_CODEC
    )
    quantized = [(i, t) for i, t in enumerate(header.tensors) if t.kind == "quantized"]
    bar = tqdm(
        quantized,
        desc="measure settings",
        unit="tensor",
        disable=not progress,
        file=sys.stderr,
    )
    for index, entry in bar:
        pre = pretrained.load_float(entry.name)
        grid = groups or (model.group_size,)
        args = (entry, index, pre, finetuned, header, grid, weighting, model)
        new, n2 = _measure_entry(*args)
        items.extend(new)
        norm2 += n2
    if not items:
        size = archive_size(header)
        if size > budget:
            raise UsageError(f"budget {budget_bpw} bpw is below the archive's {_bpw(header, size)}")
        return Allocation(budget, size, 0.0, None)
    smallest_pick = [
        min(range(len(i.options)), key=lambda j, i=i: i.options[j].nbytes) for i in items
    ]
    _apply(header, items, smallest_pick)
    fixed = archive_size(header) - _size(items, smallest_pick)  # what no option counts
    available = budget - fixed
    smallest = _size(items, smallest_pick)
    if smallest > available:
        raise UsageError(
            f"budget {budget_bpw} bits per weight is too small: these settings need at least "
            f"{header.bits_per_weight(smallest + fixed):.3f}"
        )
    pick, size, uniform_err = _fit(header, items, available, budget)
    err = sum(item.options[j].reported for item, j in zip(items, pick, strict=True))
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
        uniform_pick, uniform_err = _uniform(items, available, pick)
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
