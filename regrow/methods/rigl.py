"""RigL (Evci et al., 2020): grow the inactive connections with the largest |dL/dw|.

The gradient is the update step's dense one, read in blocks of output rows
(regrow.core.row_blocks), so the always-sparse backend never holds it whole; grown weights
start at zero with zero optimizer state.
"""
from __future__ import annotations

from ..core.row_blocks import grad_magnitude, top_candidates
from .base import Method, register


@register
class RigL(Method):
    name = "rigl"
    needs_grad = True

    def grow(self, target, k, ctx):
        return top_candidates(target, k, grad_magnitude, ties=lambda flat: ctx.ties(target, flat))

    def grow_scores(self, target, candidates, ctx):
        """|dL/dw| of given candidates (N:M growth ranks a group's own positions)."""
        return target.grad_at(candidates).abs()
