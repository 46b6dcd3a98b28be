"""Rank-consistent topology under torch.distributed.

Decisions are identical on every rank by construction: growth reads gradients that DDP has
already all-reduced, random choices come from a generator seeded the same on every rank, and
ties break by index (regrow.selection). This module adds the cheap proof: after each topology
update, a per-layer checksum of the active indices is all-reduced (min and max) and any
disagreement raises, naming the first layer that diverged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .backends.base import SparseTarget

_MIX = 0x9E3779B97F4A7C15 & 0x7FFFFFFFFFFFFFFF   # odd constant: spreads indices over int64


class MaskDivergenceError(RuntimeError):
    """Raised when ranks hold different masks after a topology update."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mask_checksums(targets: Sequence[SparseTarget]) -> torch.Tensor:
    """One int64 per layer: a wrapping sum of hashed active flat indices, plus the count."""
    sums = []
    for t in targets:
        idx = t.active_indices().to(torch.int64)
        hashed = (idx + 1) * _MIX   # int64 arithmetic wraps identically on every rank
        sums.append(int(hashed.sum()) ^ (t.nnz << 1))
    return torch.tensor(sums, dtype=torch.int64)


def check_masks_agree(targets: Sequence[SparseTarget], step: int) -> None:
    """All-reduce the mask checksums; raise MaskDivergenceError if any rank differs."""
    if not is_distributed():
        return
    local = mask_checksums(targets)
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    lo, hi = local.to(device), local.to(device).clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    differs = (lo != hi).cpu()
    if bool(differs.any()):
        first = targets[int(differs.nonzero()[0])].name
        raise MaskDivergenceError(
            f"regrow: masks diverged across ranks at step {step}, first in layer '{first}'; "
            "every rank must use the same seed and all-reduced gradients (wrap the model in DDP)")
