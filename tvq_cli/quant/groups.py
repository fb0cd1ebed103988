"""Viewing a tensor as quantization groups, and the min-max step of a group.

``group_size == 0`` gives one group per tensor (the paper's setting). ``group_size == G`` gives
one group per G consecutive elements along the last dimension; groups never cross rows, so
when G does not divide a row the row's last group is shorter (its `tail`), and a G at least as
long as a row is one group per row. The work is always on the tensor's own elements: a row is
never padded to G (a huge G once made every row G elements long: 18+ minutes and 1 GB for a
2.5M-parameter model at G = 100000).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import MAX_SCALE


def minmax_scale(span: torch.Tensor, levels: int, flat: float = 1.0) -> torch.Tensor:
    """Each group's ``levels / span``, at most `MAX_SCALE` (a subnormal span would make it
    infinite, and the archive unreadable); `flat` for groups with a zero span."""
    scale = (levels / torch.where(span > 0, span, 1.0)).clamp_(max=MAX_SCALE)
    return torch.where(span > 0, scale, flat)


def row_group_size(group_size: int, cols: int) -> int:
    """The length of a row's full groups: G, or the row itself when G is longer (the same
    groups, codes and scales as G = cols); 0 stays 0 (one group per tensor)."""
    return min(group_size, cols) if group_size else 0


@dataclass(frozen=True)
class Grouping:
    """How a tensor splits into groups, in storage order: per row, `full` groups of `size`
    elements, then one group of the `tail` elements left over (none when `tail` is 0).

    Quantization works on at most two [groups, width] pieces of uniform width: the full
    groups of every row, and the tails of every row."""

    rows: int
    size: int  # elements of a full group; the whole tensor when group_size is 0
    full: int  # full groups per row
    tail: int  # elements of each row's short last group (0: none)

    @classmethod
    def of(cls, shape: tuple[int, ...], group_size: int) -> Grouping:
        numel = torch.Size(shape).numel()
        if group_size == 0 or not shape:
            return cls(1, numel, 1, 0)
        cols = shape[-1]
        size = row_group_size(group_size, cols)
        return cls(numel // cols if cols else 0, size, cols // size if size else 0, cols % size)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The pieces of `x` (elements in row-major order): [rows * full, size] and, with a
        tail, [rows, tail]."""
        if not self.tail:
            return [x.reshape(-1, self.size)]
        rows = x.reshape(self.rows, -1)
        head = rows[:, : self.full * self.size].reshape(-1, self.size)
        return [head, rows[:, self.full * self.size :]]

    def join(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of `split`, flat: per-element pieces back in row-major order, or per-group
        values ([groups] or [groups, 1] per piece) back in group order."""
        if not self.tail:
            return pieces[0].reshape(-1)
        head, tail = pieces
        return torch.cat([head.reshape(self.rows, -1), tail.reshape(self.rows, -1)], 1).reshape(-1)

    def split_groups(self, values: torch.Tensor) -> list[torch.Tensor]:
        """One value per group (in group order) as the pieces' per-group values."""
        if not self.tail:
            return [values.reshape(-1)]
        rows = values.reshape(self.rows, self.full + 1)
        return [rows[:, : self.full].reshape(-1), rows[:, self.full]]


def expand_groups(values: torch.Tensor, shape: tuple[int, ...], group_size: int) -> torch.Tensor:
    """Broadcast one value per group (e.g. a step size) to every element of a tensor of `shape`."""
    values = values.to(torch.float32).reshape(-1)
    if group_size == 0 or len(shape) == 0:
        return values[:1].expand(shape).clone() if values.numel() else torch.zeros(shape)
    cols = shape[-1]
    size = row_group_size(group_size, cols)
    per_row = -(-cols // size) if size else 0
    rows = values.reshape(-1, per_row).repeat_interleave(size, dim=1)[:, :cols]
    return rows.reshape(shape).contiguous()
