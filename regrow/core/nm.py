"""N:M structure: exactly N active weights in every group of M consecutive input weights.

A weight seen as ``[rows, cols]`` is grouped per output row along its input dimension; a conv
kernel ``[out, in_c, *taps]`` is grouped along the input channel, at each spatial tap (groups
of M input channels that share (kh, kw)), the layout sparse tensor cores accelerate. Every
group holds exactly N active weights; a topology update drops and grows inside groups, so a
group that lost d weights grows d back among its own inactive positions.
"""
from __future__ import annotations

import math

import torch

from .target import SparseTarget


def parse_nm(spec: str | None) -> tuple[int, int] | None:
    """"N:M" -> (N, M) with 0 < N < M; None stays None."""
    if spec is None:
        return None
    try:
        n, m = (int(x) for x in str(spec).split(":"))
    except ValueError:
        raise ValueError(f"nm must look like '2:4' (N:M), got {spec!r}") from None
    if not 0 < n < m:
        raise ValueError(f"nm='{spec}' needs 0 < N < M")
    return n, m


def nm_sparsity(nm: tuple[int, int], sparsity: float | None) -> float:
    """The sparsity N:M implies, 1 - N/M; a different ``sparsity`` is an error."""
    implied = 1.0 - nm[0] / nm[1]
    if sparsity is not None and not math.isclose(sparsity, implied, abs_tol=1e-9):
        raise ValueError(f"nm='{nm[0]}:{nm[1]}' means sparsity {implied:g}, not {sparsity}; "
                         f"pass sparsity={implied:g} (or, in Python, leave it out)")
    return implied


def taps(target: SparseTarget) -> int:
    """Input positions per input channel (kh x kw for a conv, 1 for a linear weight)."""
    shape = tuple(getattr(target, "param").shape) if hasattr(target, "param") else (target.rows, target.cols)
    return math.prod(shape[2:]) if len(shape) > 2 else 1


def check_layers(targets, m: int) -> None:
    """Every weight's input channels must split into groups of M; always-sparse layers refuse."""
    for t in targets:
        if t.preinitialised or not hasattr(t, "param"):
            raise ValueError(f"nm needs masked layers; '{t.name}' is always-sparse and chose its own topology")
        channels = t.cols // taps(t)
        if channels % m:
            raise ValueError(f"nm: '{t.name}' has {channels} input channels, not a multiple of M={m}")


def group_of(target: SparseTarget, flat: torch.Tensor, m: int) -> torch.Tensor:
    """Group id (row-major over the layer's groups) of each flat index."""
    k = taps(target)
    row, col = flat // target.cols, flat % target.cols
    channel, tap = col // k, col % k
    return row * (target.cols // m) + (channel // m) * k + tap


def members(target: SparseTarget, groups: torch.Tensor, m: int) -> torch.Tensor:
    """``[len(groups), M]`` flat indices of each group's positions."""
    k = taps(target)
    per_row = target.cols // m
    row, rest = groups // per_row, groups % per_row
    first_channel, tap = (rest // k) * m, rest % k
    channels = first_channel[:, None] + torch.arange(m, device=groups.device)[None, :]
    return row[:, None] * target.cols + channels * k + tap[:, None]


def top_per_group(groups: torch.Tensor, scores: torch.Tensor, need: torch.Tensor,
                  tie_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the ``need[g]`` best scores within each group g (``need`` indexed by the
    position in ``torch.unique(groups)``); ties by the larger tie key, else the lower position."""
    order = torch.arange(scores.numel(), device=scores.device)
    if tie_keys is not None:
        order = order[torch.sort(tie_keys[order], descending=True, stable=True).indices]
    order = order[torch.sort(scores[order], descending=True, stable=True).indices]
    order = order[torch.sort(groups[order], stable=True).indices]
    uniq, counts = torch.unique_consecutive(groups[order], return_counts=True)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(order.numel(), device=order.device) - first
    return order[rank < torch.repeat_interleave(need, counts)].sort().values


def keep_top_per_group(target: SparseTarget, priority: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A ``[rows, cols]`` mask keeping the n largest ``priority`` entries of every group."""
    flat = torch.arange(target.numel, device=priority.device)
    groups = group_of(target, flat, m)
    need = torch.full((target.numel // m,), n, dtype=torch.long, device=priority.device)
    mask = torch.zeros(target.numel, dtype=torch.bool, device=priority.device)
    mask[top_per_group(groups, priority.reshape(-1), need)] = True
    return mask.view(target.rows, target.cols)


def grow_within_groups(target: SparseTarget, drop: torch.Tensor, m: int, score, ties) -> torch.Tensor:
    """Each group regrows as many as it lost, its best-scored positions inactive before the
    update (``score(candidates)``, ``ties(candidates)``): O(k * M), no dense tensor."""
    lost_groups, lost = torch.unique(group_of(target, drop, m), return_counts=True)
    candidates = members(target, lost_groups, m).reshape(-1)
    candidates = candidates[~target.is_active(candidates)]   # the dropped are still active here
    groups = group_of(target, candidates, m)
    need = lost[torch.searchsorted(lost_groups, torch.unique(groups))]
    return candidates[top_per_group(groups, score(candidates), need, ties(candidates))]


def group_counts(target: SparseTarget, m: int) -> torch.Tensor:
    """Active weights per group (for checks)."""
    return torch.bincount(group_of(target, target.active_indices(), m), minlength=target.numel // m)


def cap_per_group(target: SparseTarget, drop: torch.Tensor, m: int, cap: int) -> torch.Tensor:
    """``drop`` with at most ``cap`` (= M - N, the group's inactive room) per group, the
    smallest |w| kept, so every group can regrow what it lost among its own positions."""
    groups = group_of(target, drop, m)
    _, counts = torch.unique(groups, return_counts=True)
    if counts.numel() == 0 or int(counts.max()) <= cap:
        return drop
    active = target.active_indices()
    magnitude = target.active_values().abs()[torch.searchsorted(active, drop)]
    need = torch.full((counts.numel(),), cap, dtype=torch.long, device=drop.device)
    return drop[top_per_group(groups, -magnitude.float(), need)]
