"""SynFlow (Tanaka et al., NeurIPS 2020): iterative synaptic flow pruning, without data.

R = 1^T (prod_l |W_l|) 1: the sum of the outputs of the network with every parameter and
buffer replaced by its absolute value (double precision, evaluation mode so norms use their
running statistics), on one all-ones input of the first batch's shape. Score |w * dR/dw|;
over ``rounds`` rounds the kept count shrinks exponentially, n * d^(r / rounds), to the target
density d, re-scoring the masked network each round (as in the authors' code). Pruned weights
score nothing and never return. The model itself is not modified (torch.func.functional_call).
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from .base import register
from .prune_at_init import PruneAtInit


@register
class SynFlow(PruneAtInit):
    name = "synflow"

    def __init__(self, *, rounds: int = 100, scope: str = "global"):
        super().__init__(scope=scope)
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.rounds = rounds

    supports_nm = False   # its rounds prune globally toward a total

    def decide_masks(self, targets, first):
        if first.input_shape is None:
            raise ValueError("synflow needs the input shape: run the first forward before step()")
        model = first.model
        state = {n: p.detach().abs().double() for n, p in model.named_parameters()}
        state.update({n: b.detach().abs().double() if b.is_floating_point() else b
                      for n, b in model.named_buffers()})
        device = next(iter(state.values())).device
        ones = torch.ones((1,) + tuple(first.input_shape[1:]), dtype=torch.float64, device=device)
        masks = {t.name: torch.ones(t.numel, dtype=torch.bool, device=device) for t in targets}
        final = {t.name: t.budget for t in targets}
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            for r in range(1, self.rounds + 1):
                scores = self._scores(model, targets, state, masks, ones)
                shrink = r / self.rounds   # kept = n * d^(r / rounds): exact at the last round
                counts = {t.name: round(t.numel * (final[t.name] / t.numel) ** shrink) for t in targets}
                dense, total = sum(t.numel for t in targets), sum(final.values())
                masks = self.keep_largest(targets, scores, counts if r < self.rounds else final,
                                          total=round(dense * (total / dense) ** shrink))
                masks = {n: m.to(device) for n, m in masks.items()}
        finally:
            for m, training in modes.items():
                m.train(training)
        self.apply_masks(targets, masks)

    @staticmethod
    def _scores(model, targets, state, masks, ones) -> dict[str, torch.Tensor]:
        """|w * dR/dw| of the masked, absolute-valued network; pruned weights score -1."""
        weights = {t.name: (state[t.name].reshape(-1) * masks[t.name]).requires_grad_() for t in targets}
        shaped = {n: w.view(state[n].shape) for n, w in weights.items()}
        with torch.enable_grad():
            out = functional_call(model, {**state, **shaped}, (ones,))
            flow = out.sum()
            grads = torch.autograd.grad(flow, list(weights.values()), allow_unused=True)
        scores = {}
        for (name, w), g in zip(weights.items(), grads):
            s = torch.zeros_like(w) if g is None else (g * w).detach().abs()
            scores[name] = s.masked_fill(~masks[name], -1.0)
        return scores
