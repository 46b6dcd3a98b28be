"""Sparsity statistics: density, ITOP rate (ever-active fraction) and active neurons."""
from __future__ import annotations

from typing import Sequence

import torch

from .target import SparseTarget


def sparsity_stats(targets: Sequence[SparseTarget]) -> dict:
    """Overall and per-layer counts over the sparsified weights.

    ``itop_rate`` is the fraction of all sparsified weights that have been active at any
    time (Liu et al.'s in-time over-parameterisation rate; DST-EE's exploration degree R).
    """
    layers = {}
    nnz = numel = ever = 0
    for t in targets:
        n = t.nnz
        layers[t.name] = {
            "density": n / t.numel,
            "nnz": n,
            "numel": t.numel,
            "active_neurons": int((t.row_counts() > 0).sum()),
            "neurons": t.rows,
        }
        nnz += n
        numel += t.numel
        ever += t.ever_active_count()
    return {"density": nnz / numel, "nnz": nnz, "numel": numel, "itop_rate": ever / numel,
            "layers": layers}


def rewired_counts(before: torch.Tensor, after: torch.Tensor) -> dict:
    """``{"dropped", "grown"}``: how many active flat indices one update removed and added,
    from the sorted active indices before and after it."""
    kept = int(torch.isin(before, after, assume_unique=True).sum())
    return {"dropped": before.numel() - kept, "grown": after.numel() - kept}
