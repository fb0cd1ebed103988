"""Viewing a tensor as quantization groups, and the min-max step of a group.

``group_size == 0`` gives one group per tensor (the paper's setting). ``group_size == G`` gives
one group per G consecutive elements along the last dimension; when the last dimension is not a
multiple of G, the last group of each row is shorter (padded here by repeating the row's last
element, which leaves every group's min and max unchanged).
"""

from __future__ import annotations

import torch

from .spec import MAX_SCALE


def minmax_scale(span: torch.Tensor, levels: int, flat: float = 1.0) -> torch.Tensor:
    """Each group's ``levels / span``, at most `MAX_SCALE` (a subnormal span would make it
    infinite, and the archive unreadable); `flat` for groups with a zero span."""
    scale = (levels / torch.where(span > 0, span, 1.0)).clamp_(max=MAX_SCALE)
    return torch.where(span > 0, scale, flat)


def grouped(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """View `x` as (groups, group_len); returns the view and the padded row length (0 if none)."""
    if group_size == 0:
        return x.reshape(1, -1), 0
    cols = x.shape[-1]
    rows = x.reshape(-1, cols)
    pad = (-cols) % group_size
    if pad == 0:
        return rows.reshape(-1, group_size), 0
    padded = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
    return padded.reshape(-1, group_size), cols + pad


def ungrouped(groups: torch.Tensor, shape: tuple[int, ...], padded_cols: int) -> torch.Tensor:
    """Inverse of `grouped`: the tensor of `shape`, padding dropped."""
    if padded_cols:
        return groups.reshape(-1, padded_cols)[:, : shape[-1]].reshape(shape)
    return groups.reshape(shape)


def expand_groups(values: torch.Tensor, shape: tuple[int, ...], group_size: int) -> torch.Tensor:
    """Broadcast one value per group (e.g. a step size) to every element of a tensor of `shape`."""
    values = values.to(torch.float32).reshape(-1)
    if group_size == 0 or len(shape) == 0:
        return values[:1].expand(shape).clone() if values.numel() else torch.zeros(shape)
    cols = shape[-1]
    per_row = -(-cols // group_size)
    rows = values.reshape(-1, per_row).repeat_interleave(group_size, dim=1)[:, :cols]
    return rows.reshape(shape).contiguous()
