"""Subset samplers for GSE: which inactive connections get their gradient looked at.

All samplers return sorted, duplicate-free flat indices of *inactive* connections and never
enumerate the rows x cols grid: pairs are drawn with replacement, active and repeated pairs
are rejected, and drawing continues until enough distinct pairs are found. Their cost is
O(subset) plus, for the factorised ones, O(rows + cols) to build the marginals.
"""
from __future__ import annotations

import math

import torch

from .target import SparseTarget
from .distributed import all_reduce_sum, global_rows
from .row_blocks import rows_per_block
from .selection import largest_k
from .sorted_keys import merge_sorted, sorted_uniform_draws, union_sorted

SAMPLERS = ("uniform", "grabo", "graest")
_MAX_ROUNDS = 8   # factorised draws that keep hitting the same few pairs stop after this


def _draw_until(target: SparseTarget, m: int, draw, rounds: int | None = None,
                found: torch.Tensor | None = None) -> torch.Tensor:
    """Distinct inactive flat indices from repeated calls of ``draw(n)`` (n keys, sorted,
    repeats allowed) added to the sorted ``found`` until there are at least m (or ``rounds``
    draws were made); returned sorted.

    Each draw is sized by the acceptance rate seen so far, so when most of the remaining
    candidates are already found (a subset close to the whole inactive set) the number of
    rounds stays small instead of crawling through the coupon-collector tail. Sorted draws
    make every step linear: repeats are neighbours, the activity lookups walk the layer's
    index in order, and merging into ``found`` needs no sort.
    """
    if found is None:
        found = torch.empty(0, dtype=torch.long, device=target.device)
    attempt, rate = 0, 1.0
    while found.numel() < m and (rounds is None or attempt < rounds):
        attempt += 1
        need = m - found.numel()
        n = min(math.ceil(need * 1.25 / rate) + 16, 4 * target.numel + 16)
        flat = torch.unique_consecutive(draw(n))
        flat = flat[~target.is_active(flat)]
        before = found.numel()
        found = union_sorted(found, flat)
        rate = max((found.numel() - before) / n, 1e-4)
    return found


def _subsample(flat: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random m-subset of ``flat``, kept sorted (the set of distinct values of
    i.i.d. draws is itself a uniform subset, so this keeps uniformity)."""
    if flat.numel() <= m:
        return flat
    # the m positions with the smallest random keys: a uniform m-subset by selection, O(n)
    # (randperm costs more at tens of millions), returned ascending, so no sort either
    return flat[largest_k(torch.rand(flat.numel(), dtype=torch.float64, generator=gen), m).to(flat.device)]


def uniform_inactive(target: SparseTarget, m: int, gen: torch.Generator,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
    """m distinct inactive connections, uniformly at random, none of them in ``exclude``
    (a sorted, duplicate-free index tensor); fewer if fewer are available."""
    excluded = 0 if exclude is None else exclude.numel()
    available = target.numel - target.nnz - excluded
    m = min(m, available)
    if m <= 0:
        return torch.empty(0, dtype=torch.long, device=target.device)
    if available <= 2 * m:
        # nearly dense: rejection would mostly reject, so when the grid is enumerable use it
        try:
            pool = target.inactive_indices()
            if exclude is not None:
                pool = pool[~torch.isin(pool, exclude)]
            return _subsample(pool, m, gen)
        except NotImplementedError:
            pass

    def draw(n: int) -> torch.Tensor:
        return sorted_uniform_draws(target.rows, target.cols, n, gen).to(target.device)
    found = _draw_until(target, m + excluded, draw, found=exclude)
    if exclude is not None:
        found = found[~torch.isin(found, exclude)]
    return _subsample(found, m, gen)


def _factorised(target: SparseTarget, m: int, gen: torch.Generator,
                row_weights: torch.Tensor, col_weights: torch.Tensor) -> torch.Tensor:
    """Rows and columns drawn independently from the two marginals, with replacement."""
    inactive = target.numel - target.nnz
    m = min(m, inactive)
    if m <= 0:
        return torch.empty(0, dtype=torch.long, device=target.device)
    rw = row_weights.detach().double().cpu().clamp_min(0)
    cw = col_weights.detach().double().cpu().clamp_min(0)
    if not (rw.sum() > 0 and cw.sum() > 0 and torch.isfinite(rw).all() and torch.isfinite(cw).all()):
        return uniform_inactive(target, m, gen)

    def draw(n: int) -> torch.Tensor:
        r = torch.multinomial(rw, n, replacement=True, generator=gen)
        c = torch.multinomial(cw, n, replacement=True, generator=gen)
        return (r * target.cols + c).sort().values.to(target.device)

    found = _draw_until(target, m, draw, rounds=_MAX_ROUNDS)
    if found.numel() < m:
        # the marginals put their mass on too few pairs: top up uniformly (documented choice)
        extra = uniform_inactive(target, m - found.numel(), gen, exclude=found)
        found = merge_sorted(found, extra)   # disjoint: extra excludes found
    return _subsample(found, m, gen)


def _marginals(target: SparseTarget, kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(row weights over output neurons, column weights over inputs) for GraBo / GraEst."""
    pair = target.activations()
    if pair is None:
        # no captured activations (convolutions, attention in the masked backend): use the
        # gradient's row and column sums of |grad| as the factorised distribution
        return _abs_grad_sums(target)
    h, delta = pair
    # h and delta are this rank's share of the batch (DDP all-reduces p.grad, not these), so
    # the marginals are summed over ranks before use: every rank then samples the same subset
    h, delta = h.float(), delta.float()   # autocast captures mixed dtypes; fp16 sums overflow
    if kind == "grabo":
        # Lemma 1: |dL/dw_oi| <= ||delta_o|| ||h_i||; the reference code uses the batch sums of |.|
        return all_reduce_sum(delta.abs().sum(0), h.abs().sum(0))
    # graest: an AMS sketch, a = H^T s, d = Delta^T s with one random sign per sample; signs are
    # drawn for the global batch and sliced, so the sketch is the one a single process would make
    offset, total = global_rows(h.shape[0])
    signs = torch.randint(0, 2, (total,), generator=gen)[offset:offset + h.shape[0]]
    signs = signs.to(h.device, h.dtype) * 2 - 1
    a, d = all_reduce_sum(signs @ delta, signs @ h)
    return a.abs(), d.abs()


def _abs_grad_sums(target: SparseTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of |dL/dW|, read in blocks of rows (``target.grad_rows``), so that a
    backend without a dense gradient (SparseConv2d) gives them too; a layer that fits one block
    sums exactly as the whole gradient would."""
    step = rows_per_block(target.cols)
    row_sums, col_sums = [], None
    for start in range(0, target.rows, step):
        g = target.grad_rows(start, min(target.rows, start + step)).abs()
        row_sums.append(g.sum(1))
        col_sums = g.sum(0) if col_sums is None else col_sums.add_(g.sum(0))
    return torch.cat(row_sums), col_sums


def sample_subset(kind: str, target: SparseTarget, m: int, gen: torch.Generator) -> torch.Tensor:
    """m distinct inactive connections drawn by the named distribution."""
    if kind == "uniform":
        return uniform_inactive(target, m, gen)
    if kind in ("grabo", "graest"):
        rows, cols = _marginals(target, kind, gen)
        return _factorised(target, m, gen, rows, cols)
    raise ValueError(f"unknown sampling '{kind}'; choose one of {', '.join(SAMPLERS)}")
