"""DST-EE (Huang et al., arXiv 2211.16667): exploitation plus exploration.

Grow score for an inactive weight: S = |dL/dw| + c * ln(t) / (N + eps), where N counts the
updates in which the weight was active (N starts as the initial mask and adds the mask after
every update, Algorithm 1). The paper leaves c and eps to tuning; our defaults c=1e-3,
eps=1.0 make a never-active weight worth about c*ln(t) of gradient magnitude.

N is kept only for connections that were ever active (sorted flat keys and their counts, as
the ITOP set): every other connection has N = 0, so its bonus is the constant c * ln(t) / eps.
The gradient is scanned in blocks of rows (regrow.core.row_blocks), so no out x in tensor is
needed on either backend.
"""
from __future__ import annotations

import math

import torch

from ..core.row_blocks import grad_magnitude, top_candidates
from ..core.sorted_keys import union_sorted
from .base import Method, register


@register
class DSTEE(Method):
    name = "dstee"
    needs_grad = True

    def __init__(self, *, c: float = 1e-3, eps: float = 1.0, grow_init: str = "zero"):
        super().__init__(grow_init=grow_init)
        if c < 0 or eps <= 0:
            raise ValueError(f"dstee needs c >= 0 and eps > 0, got c={c}, eps={eps}")
        self.c, self.eps = c, eps
        #: per layer: (sorted flat keys ever active, how many updates each was active)
        self.visits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def init_masks(self, targets, gen):
        super().init_masks(targets, gen)
        for t in targets:
            self._visits(t)

    def _visits(self, target) -> tuple[torch.Tensor, torch.Tensor]:
        # always-sparse layers bring their own initial topology (init_masks does not see them):
        # their counts start from it at the first update, before anything was rewired
        if target.name not in self.visits:
            keys = target.active_indices().clone()
            self.visits[target.name] = (keys, torch.ones(keys.numel(), dtype=torch.int32, device=keys.device))
        return self.visits[target.name]

    def grow(self, target, k, ctx):
        keys, counts = self._visits(target)
        log_t = math.log(ctx.step)

        def score(block, out):
            s = grad_magnitude(block, out).add_(self.c * log_t / self.eps)   # N = 0: never active
            lo, hi = torch.searchsorted(keys, torch.tensor([block.offset, block.offset + block.grad.numel()],
                                                           device=keys.device)).tolist()
            seen = keys[lo:hi] - block.offset
            flat = s.view(-1)
            flat[seen] = (block.grad.view(-1)[seen].abs() + self.c * log_t / (counts[lo:hi].float() + self.eps)).to(s.dtype)
            return s

        return top_candidates(target, k, score, ties=lambda flat: ctx.ties(target, flat))

    def grow_scores(self, target, candidates, ctx):
        """The score of given candidates (N:M growth ranks a group's own positions)."""
        keys, counts = self._visits(target)
        visits = torch.zeros(candidates.numel(), device=candidates.device)
        if keys.numel():
            pos = torch.searchsorted(keys, candidates).clamp_(max=keys.numel() - 1)
            hit = keys[pos] == candidates
            visits[hit] = counts[pos[hit]].float()
        return target.grad_at(candidates).abs() + self.c * math.log(ctx.step) / (visits + self.eps)

    def after_update(self, targets, ctx):
        for t in targets:
            keys, counts = self._visits(t)
            active = t.active_indices()
            merged = union_sorted(keys, active)
            new_counts = torch.zeros(merged.numel(), dtype=torch.int32, device=merged.device)
            new_counts[torch.searchsorted(merged, keys)] = counts
            new_counts[torch.searchsorted(merged, active)] += 1
            self.visits[t.name] = (merged, new_counts)

    def state_dict(self) -> dict:
        return {"visits": {k: (keys.clone(), n.clone()) for k, (keys, n) in self.visits.items()}}

    def load_state_dict(self, state: dict) -> None:
        if "counts" in state:   # checkpoints before the sparse key set held one dense count per weight
            visits = {k: (c.nonzero().squeeze(1), c[c > 0].to(torch.int32)) for k, c in
                      ((k, c.reshape(-1)) for k, c in state["counts"].items())}
        else:
            visits = state["visits"]
        for name, (keys, counts) in visits.items():
            device = self.visits[name][0].device if name in self.visits else keys.device
            self.visits[name] = (keys.to(device, torch.long, copy=True), counts.to(device, torch.int32, copy=True))
