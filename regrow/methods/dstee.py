"""DST-EE (Huang et al., arXiv 2211.16667): exploitation plus exploration.

Grow score for an inactive weight: S = |dL/dw| + c * ln(t) / (N + eps), where N counts the
updates in which the weight was active (N starts as the initial mask and adds the mask after
every update, Algorithm 1). The paper leaves c and eps to tuning; our defaults c=1e-3,
eps=1.0 make a never-active weight worth about c*ln(t) of gradient magnitude.
"""
from __future__ import annotations

import math

import torch

from .base import Method, register


@register
class DSTEE(Method):
    name = "dstee"
    needs_grad = True
    sparse_backend = False

    def __init__(self, *, c: float = 1e-3, eps: float = 1.0, grow_init: str = "zero"):
        super().__init__(grow_init=grow_init)
        if c < 0 or eps <= 0:
            raise ValueError(f"dstee needs c >= 0 and eps > 0, got c={c}, eps={eps}")
        self.c, self.eps = c, eps
        self.counts: dict[str, torch.Tensor] = {}

    def init_masks(self, targets, gen):
        super().init_masks(targets, gen)
        for t in targets:
            self.counts[t.name] = torch.zeros(t.numel, dtype=torch.int32, device=t.device)
            self.counts[t.name][t.active_indices()] = 1

    def grow_scores(self, target, candidates, ctx):
        visits = self.counts[target.name][candidates].float()
        return target.grad_at(candidates).abs() + self.c * math.log(ctx.step) / (visits + self.eps)

    def after_update(self, targets, ctx):
        for t in targets:
            self.counts[t.name][t.active_indices()] += 1

    def state_dict(self) -> dict:
        return {"counts": {k: v.clone() for k, v in self.counts.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, counts in state["counts"].items():
            device = self.counts[name].device if name in self.counts else counts.device
            self.counts[name] = counts.to(device, copy=True)
