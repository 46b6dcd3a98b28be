"""Growth by the dense gradient without holding it: the gradient scanned in blocks of rows.

RigL-family growth ranks every inactive connection by a score of dL/dW, which is out x in.
Nothing here needs all of it at once: a target's ``grad_rows(start, stop)`` gives one block of
output rows (the masked backend slices the gradient it holds; the always-sparse backend
computes ``delta_block^T h`` from the update step's captured activations), the method scores
the block, and the best inactive positions are kept as the scan goes:

* :func:`top_candidates`: the k best candidates of the layer (RigL, DST-EE: the inactive
  connections), a running top-k merged block by block;
* :func:`top_candidates_per_row`: the best ``counts[r]`` candidates of each row (SRigL's
  per-neuron regrowth).

Candidates are every connection except a sorted key set ``excluded``: by default the active
connections (growth among the inactive ones); SRigL passes others (no exclusion for its
saliency, its kept weights for regrowth).

Extra memory is O(k + block x cols) at any width. A block holds about ``block_bytes`` of
working memory: the argument, else ``REGROW_GROWTH_BLOCK_BYTES`` (read at each scan), else
:data:`GROWTH_BLOCK_BYTES`. Ties are broken as :func:`regrow.core.selection.largest_k` breaks
them over the whole layer at once (by ``ties(flat)`` keys, largest first, else the lower flat
index), so the result is the same whatever the block size and on either backend.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .selection import largest_k
from .target import SparseTarget

#: default working memory of one block of rows (bytes)
GROWTH_BLOCK_BYTES = 16 << 20
#: bytes per entry of a block: the gradient and its score (float32), the excluded mask and two
#: comparison masks (bool), and an int64 position for entries that pass the filter
_BYTES_PER_ENTRY = 24


def block_bytes_setting(block_bytes: int | None = None) -> int:
    """The working memory of one block: ``block_bytes``, else the environment, else the default."""
    if block_bytes is None:
        text = os.environ.get("REGROW_GROWTH_BLOCK_BYTES", "").strip()
        if not text:
            return GROWTH_BLOCK_BYTES
        try:
            block_bytes = int(text)
        except ValueError:
            raise ValueError(f"REGROW_GROWTH_BLOCK_BYTES must be a positive number of bytes, got {text!r}") from None
    if block_bytes < 1:
        raise ValueError(f"the growth block size must be a positive number of bytes, got {block_bytes}")
    return block_bytes


def rows_per_block(cols: int, block_bytes: int | None = None) -> int:
    """How many rows of ``cols`` entries fit one block (at least one)."""
    return max(1, block_bytes_setting(block_bytes) // (_BYTES_PER_ENTRY * max(1, cols)))


@dataclass
class RowBlock:
    """Rows ``start:stop`` of a layer: their gradient and which of their positions are excluded."""

    start: int
    stop: int
    cols: int
    grad: torch.Tensor          # [stop - start, cols] dL/dW
    excluded: torch.Tensor      # sorted positions within the block (row-major) that are not candidates

    @property
    def offset(self) -> int:
        """Flat index of the block's first entry."""
        return self.start * self.cols

    def excluded_mask(self) -> torch.Tensor:
        """[stop - start, cols] bool: which positions of the block are not candidates."""
        mask = torch.zeros(self.grad.numel(), dtype=torch.bool, device=self.grad.device)
        mask[self.excluded] = True
        return mask.view_as(self.grad)


#: ``score(block, out)``: the block's growth scores, written into ``out`` (a [rows, cols] buffer
#: the scan reuses for every block, so that memory stays flat) and returned
Score = Callable[[RowBlock, torch.Tensor], torch.Tensor]
#: tie-break keys of flat positions (e.g. ``lambda flat: ctx.ties(target, flat)``)
Ties = Callable[[torch.Tensor], torch.Tensor]


def grad_magnitude(block: RowBlock, out: torch.Tensor) -> torch.Tensor:
    """|dL/dw| of a block, written into the scan's buffer (the RigL score; also DST-EE's and
    SRigL's gradient term). The buffer is float32 or wider, whatever the gradient's dtype."""
    return out.copy_(block.grad).abs_()


def row_blocks(target: SparseTarget, block_bytes: int | None = None,
               excluded: torch.Tensor | None = None) -> Iterator[RowBlock]:
    """The layer's gradient in blocks of output rows, each with its excluded positions
    (sorted flat keys ``excluded``; default: the active connections)."""
    rows, cols = target.rows, target.cols
    step = rows_per_block(cols, block_bytes)
    keys = target.active_indices() if excluded is None else excluded.to(torch.long)
    starts = torch.arange(0, rows + step, step, device=keys.device).clamp_(max=rows)
    bounds = torch.searchsorted(keys, starts * cols).tolist()   # each block's share of the keys
    for i, start in enumerate(range(0, rows, step)):
        stop = min(rows, start + step)
        grad = target.grad_rows(start, stop)
        yield RowBlock(start, stop, cols, grad, (keys[bounds[i]:bounds[i + 1]] - start * cols).to(grad.device))


def _scored(block: RowBlock, score: Score, buffer: list) -> torch.Tensor:
    """The block's scores as a tensor the scan may overwrite (excluded entries are set to -inf).

    ``buffer`` holds one flat tensor reused across blocks (freshly allocated blocks of varying
    sizes fragment the C heap: peak memory then grew several-fold over a scan)."""
    n = block.grad.numel()
    dtype = torch.promote_types(block.grad.dtype, torch.float32)   # half-precision scores would tie
    if not buffer or buffer[0].numel() < n or buffer[0].dtype != dtype:
        buffer[:] = [torch.empty(n, dtype=dtype, device=block.grad.device)]
    s = score(block, buffer[0][:n].view_as(block.grad))
    if s.shape != block.grad.shape:
        raise ValueError(f"a growth score must have the block's shape {tuple(block.grad.shape)}, got {tuple(s.shape)}")
    if s.data_ptr() == block.grad.data_ptr() or not s.is_contiguous():
        s = s.contiguous().clone()   # never write into the gradient the masked backend holds
    return s


def top_candidates(target: SparseTarget, k: int, score: Score, ties: Ties | None = None,
                   excluded: torch.Tensor | None = None, block_bytes: int | None = None) -> torch.Tensor:
    """Flat indices (sorted) of the k candidates with the largest ``score(block)``; candidates
    are the connections not in the sorted keys ``excluded`` (default: the active ones, so candidates are the inactive).

    Equal to ``largest_k`` over every candidate's score at once (ties by ``ties``
    keys, else to the lower index): the best k so far and the candidates of later blocks are
    merged whenever the candidates reach k (the best k of a union is the best k of the best
    k's), so at most 2k are held. Blocks come in ascending flat order, so the pool stays
    sorted and lower-index ties resolve as over the whole layer. Once k are held, only scores
    reaching the k-th best are kept.
    """
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=target.device)
    scores: list[torch.Tensor] = []
    flats: list[torch.Tensor] = []
    held, pending = 0, 0
    floor = float("-inf")   # the k-th best score once k are held: nothing below it can enter
    buffer: list = []
    passes = torch.empty(0, dtype=torch.bool, device=target.device)
    found = torch.empty(0, 1, dtype=torch.long, device=target.device)
    for block in row_blocks(target, block_bytes, excluded):
        s = _scored(block, score, buffer).reshape(-1)
        s[block.excluded] = float("-inf")   # scores are finite (the engine checks the gradient)
        passes = passes if passes.numel() >= s.numel() else torch.empty(s.numel(), dtype=torch.bool, device=s.device)
        (torch.ge if held == k else torch.gt)(s, floor, out=passes[:s.numel()])
        pos = torch.nonzero(passes[:s.numel()], out=found.resize_(0)).squeeze(1)   # keeps its storage
        scores.append(s[pos])
        flats.append(pos + block.offset)
        pending += pos.numel()
        if held + pending >= 2 * k:
            held, floor = _merge(scores, flats, k, ties)
            pending = 0
    total = held + pending
    if total < k:
        raise ValueError(f"'{target.name}' has {total} candidate connections, fewer than the {k} asked for")
    _merge(scores, flats, k, ties)
    return flats[0]


def _merge(scores: list[torch.Tensor], flats: list[torch.Tensor], k: int, ties: Ties | None) -> tuple[int, float]:
    """Replace the pool by its best k in place; returns (k, the k-th best score)."""
    pool_score, pool_flat = torch.cat(scores), torch.cat(flats)
    keep = _largest_k(pool_score, pool_flat, k, ties)   # ascending: the pool stays sorted by flat index
    scores[:] = [pool_score[keep]]
    flats[:] = [pool_flat[keep]]
    return keep.numel(), float(scores[0].min())


def _largest_k(scores: torch.Tensor, flat: torch.Tensor, k: int, ties: Ties | None) -> torch.Tensor:
    """``largest_k`` with tie keys computed only for the entries tied at the k-th value."""
    if ties is None or scores.numel() <= k:
        return largest_k(scores, k)
    kth = torch.kthvalue(scores, scores.numel() - k + 1).values
    chosen = scores > kth
    tied = (scores == kth).nonzero().squeeze(1)
    need = k - int(chosen.sum())
    if tied.numel() > need:   # selection's own rule among the tied: largest tie keys
        tied = tied[largest_k(torch.zeros(tied.numel(), device=scores.device), need, tie_keys=ties(flat[tied]))]
    chosen[tied] = True
    return chosen.nonzero().squeeze(1)


def top_candidates_per_row(target: SparseTarget, counts: torch.Tensor, score: Score, ties: Ties | None = None,
                           excluded: torch.Tensor | None = None, block_bytes: int | None = None) -> torch.Tensor:
    """Flat indices (sorted) of each row r's ``counts[r]`` candidates of largest score
    (candidates as in :func:`top_candidates`).

    Ties at a row's cut go to the largest ``ties`` keys, else to the lower columns.
    ``counts[r]`` must not exceed row r's number of candidates.
    """
    counts = counts.to(torch.long)
    picked = []
    buffer: list = []
    for block in row_blocks(target, block_bytes, excluded):
        need = counts[block.start:block.stop].to(block.grad.device)
        most = int(need.max()) if need.numel() else 0
        if most == 0:
            continue
        out = block.excluded_mask()
        s = _scored(block, score, buffer).masked_fill_(out, float("-inf"))
        if bool(((~out).sum(1) < need).any()):
            raise ValueError(f"a row of '{target.name}' has fewer candidates than asked for")
        # the need-th largest score of each row; above it all are taken, at it the lowest columns
        top = torch.topk(s, most, dim=1).values
        kth = top.gather(1, (need - 1).clamp(min=0).unsqueeze(1))
        chosen = (s > kth) & ~out
        tied = (s == kth) & ~out
        room = need - chosen.sum(1)
        chosen |= _tied_to_take(tied, room, block, ties)
        chosen[need == 0] = False
        picked.append(chosen.reshape(-1).nonzero().squeeze(1) + block.offset)
    if not picked:
        return torch.empty(0, dtype=torch.long, device=target.device)
    return torch.cat(picked)


def _tied_to_take(tied: torch.Tensor, room: torch.Tensor, block: RowBlock, ties: Ties | None) -> torch.Tensor:
    """Which tied entries of each row fill its ``room``: largest tie keys, else lowest columns."""
    if ties is None:
        return tied & (tied.cumsum(1) <= room.unsqueeze(1))
    r, c = tied.nonzero(as_tuple=True)   # row-major order
    keys = ties(r * block.cols + c + block.offset)
    # order the tied entries by (row, key descending): two stable sorts, then rank within the row
    by_key = torch.sort(keys, descending=True, stable=True).indices
    order = by_key[torch.sort(r[by_key], stable=True).indices]
    r_sorted = r[order]
    first = torch.searchsorted(r_sorted, r_sorted, right=False)
    rank = torch.arange(r_sorted.numel(), device=r.device) - first
    take = torch.zeros_like(tied)
    pick = rank < room[r_sorted]
    take[r_sorted[pick], c[order][pick]] = True
    return take


def rank_within_rows(row: torch.Tensor, score: torch.Tensor, tie_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Each entry's rank (0 = best) among the entries of its row, by descending ``score``,
    equal scores by descending ``tie_keys`` (else lower position first). O(n log n), for the
    N active entries of a layer (SRigL: which kept weights a row keeps)."""
    order = torch.arange(row.numel(), device=row.device)
    if tie_keys is not None:
        order = torch.sort(tie_keys, descending=True, stable=True).indices
    order = order[torch.sort(score[order], descending=True, stable=True).indices]
    order = order[torch.sort(row[order], stable=True).indices]
    row_sorted = row[order]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(row.numel(), device=row.device) - torch.searchsorted(row_sorted, row_sorted)
    return rank
