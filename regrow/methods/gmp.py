"""Gradual magnitude pruning (Zhu & Gupta, 2017): the prune-from-dense baseline.

Training starts dense; at each update step between ``begin_fraction * total_steps`` and the
last update step, each layer is pruned by magnitude to s_t = s_f (1 - (1 - p)^3) sparsity,
p the progress through that window, reaching its final count at the last update; afterwards
the mask is fixed. Nothing is regrown.
"""
from __future__ import annotations

import torch

from .base import Method, UpdateContext, register


@register
class GMP(Method):
    name = "gmp"
    supports_nm = False   # prunes from dense on its own schedule
    sparse_backend = False
    sparse_backend_refusal = "starts from dense weights, which always-sparse layers never hold"

    def __init__(self, *, begin_fraction: float = 0.0):
        super().__init__(grow_init="zero")
        if not 0.0 <= begin_fraction < 1.0:
            raise ValueError(f"begin_fraction must be in [0, 1), got {begin_fraction}")
        self.begin_fraction = begin_fraction
        self.window: tuple[float, int] | None = None   # (first, last) pruning step, set by the engine

    def plan(self, schedule) -> None:
        """Fix the pruning window from the engine's update steps."""
        begin = self.begin_fraction * schedule.total_steps
        steps = [s for s in schedule.update_steps() if s >= begin]
        if not steps:
            raise ValueError("gmp has no update step to prune at: raise total_steps or stop_fraction, "
                             "or lower update_interval or begin_fraction")
        self.window = (begin, steps[-1])

    def init_masks(self, targets, gen) -> None:
        for t in targets:
            t.set_mask(torch.ones(t.rows, t.cols, dtype=torch.bool))

    def scheduled_count(self, target, step: int) -> int:
        first, last = self.window
        progress = 1.0 if last <= first else min(max((step - first) / (last - first), 0.0), 1.0)
        pruned = (target.numel - target.budget) * (1.0 - (1.0 - progress) ** 3)
        return target.numel - round(pruned)

    def update(self, target, ctx: UpdateContext) -> None:
        if ctx.step < self.window[0]:
            return
        k = target.nnz - self.scheduled_count(target, ctx.step)
        if k > 0:
            drop = self.drop(target, k, ctx)
            empty = drop[:0]
            target.rewire(drop, empty, empty.float())
