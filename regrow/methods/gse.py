"""GSE, guided stochastic exploration (Heddes et al., 2024, arXiv 2401.06898).

Sample a subset S of ceil(gamma * N) inactive connections (``sampling``: uniform, grabo or
graest; see regrow.sampling), then grow the k connections of S with the largest |dL/dw|.
Only S's gradients are needed, which the always-sparse backend computes from the layer's
inputs and output gradients in O(B * |S|).
"""
from __future__ import annotations

import math

from ..core.sampling import SAMPLERS, sample_subset
from .base import Method, register


@register
class GSE(Method):
    name = "gse"
    needs_grad = True

    def __init__(self, *, gamma: float = 1.0, sampling: str = "uniform", grow_init: str = "zero"):
        super().__init__(grow_init=grow_init)
        if sampling not in SAMPLERS:
            raise ValueError(f"unknown sampling '{sampling}'; choose one of {', '.join(SAMPLERS)}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = gamma
        self.sampling = sampling

    @property
    def needs_activations(self) -> bool:
        return self.sampling != "uniform"

    def candidates(self, target, k, ctx):
        subset = max(k, math.ceil(self.gamma * target.nnz))
        return sample_subset(self.sampling, target, subset, ctx.generator)

    def grow_scores(self, target, candidates, ctx):
        return target.grad_at(candidates).abs()
