"""RigL (Evci et al., 2020): grow the inactive connections with the largest |dL/dw|.

Needs the dense gradient of the update step's batch (masked backend only); grown weights
start at zero with zero optimizer state.
"""
from __future__ import annotations

from .base import Method, register


@register
class RigL(Method):
    name = "rigl"
    needs_grad = True
    sparse_backend = False

    def grow_scores(self, target, candidates, ctx):
        return target.grad_at(candidates).abs()
