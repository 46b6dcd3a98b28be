"""CHT, Cannistraci-Hebb training (Zhang et al., ICLR 2024); CHTs soft rule (Zhang et al.,
NeurIPS 2025): grow by topological link prediction, without gradients.

Drop the k active weights of smallest |w| (the shared rule). Grow the k missing links with the
largest CH3-L3 score on the layer's bipartite graph of active links (regrow.core.link_prediction:
length-3 paths weighted by the external degrees of their two inner nodes, as the authors'
path-based ``CH_scores_new_v2.cpp``). Links that close no length-3 path score nothing; when
fewer than k links score, the rest are grown uniformly at random.

``soft=True`` is the CHTs soft sampling rule (authors' ``_soft_sample_keep_mask``): the kept
active links are sampled without replacement with probability proportional to |w|^T, and the
grown links in proportion to their CH3-L3 score^T, T = ``temperature``. CHTs also offers a
node-based matrix approximation of CH3-L3 for GPUs; here the exact path-based score is used in
both modes. Not included: CHT's removal of neurons left without inputs or outputs, its
sparse topological initialisation and its early stop of the topology evolution.

Followed: github.com/biomedical-cybernetics/Cannistraci-Hebb-training (``CH_scores_new_v2.cpp``)
and github.com/biomedical-cybernetics/Cannistraci-Hebb-Training-Soft-Rule- (``llm/dst_scheduler.py``).
The score costs O(length-3 paths) = O(E d_in d_out) and needs only the active links, so CHT
runs on the always-sparse backend too.
"""
from __future__ import annotations

import torch

from ..core.link_prediction import ch3_l3_scores
from ..core.sampling import uniform_inactive
from ..core.selection import largest_k
from .base import Method, UpdateContext, register


def soft_sample(weights: torch.Tensor, k: int, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """k positions drawn without replacement with probability proportional to weights^T."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    if k >= weights.numel():
        return torch.arange(weights.numel())
    p = weights.double().cpu().clamp_min(1e-12) ** temperature
    return torch.multinomial(p / p.sum(), k, replacement=False, generator=gen).sort().values


@register
class CHT(Method):
    name = "cht"

    def __init__(self, *, soft: bool = False, temperature: float = 1.0, grow_init: str = "zero"):
        super().__init__(grow_init=grow_init)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.soft, self.temperature = bool(soft), temperature

    def drop(self, target, k: int, ctx: UpdateContext | None = None) -> torch.Tensor:
        if not self.soft:
            return super().drop(target, k, ctx)
        active = target.active_indices()
        kept = torch.zeros(active.numel(), dtype=torch.bool)
        kept[soft_sample(target.active_values().abs(), active.numel() - k, self.temperature, ctx.generator)] = True
        return active[(~kept).to(active.device)]

    def grow_scores(self, target, candidates, ctx):
        """CH3-L3 of given candidates (zero for those closing no path): growth within N:M groups."""
        keys, scores = ch3_l3_scores(target.active_indices(), target.rows, target.cols)
        if keys.numel() == 0:
            return torch.zeros(candidates.numel(), dtype=torch.float64)
        query = candidates.cpu()
        pos = torch.searchsorted(keys, query).clamp_(max=keys.numel() - 1)
        return torch.where(keys[pos] == query, scores[pos], 0.0)

    def grow(self, target, k: int, ctx: UpdateContext) -> torch.Tensor:
        active = target.active_indices()
        keys, scores = ch3_l3_scores(active, target.rows, target.cols)
        m = min(k, keys.numel())
        if self.soft:
            chosen = keys[soft_sample(scores, m, self.temperature, ctx.generator)]
        else:
            chosen = keys[largest_k(scores, m, tie_keys=ctx.ties(target, keys))]
        chosen = chosen.to(active.device)
        if m < k:   # too few links close a path: the rest at random, as SET would
            extra = uniform_inactive(target, k - m, ctx.generator, exclude=chosen)
            chosen = torch.cat([chosen, extra.to(active.device)])
        return chosen
