"""SNFS, sparse momentum (Dettmers & Zettlemoyer, arXiv 1907.04840): grow where momentum is.

Each layer drops its k = floor(alpha * N) smallest |w| (the shared rule). The total dropped, K,
is then redistributed across layers in proportion to each layer's mean momentum magnitude over
its active weights (measured before the drop): layer l regrows round(K * M_l / sum M) (largest
remainders, capped at the connections inactive before the update, the excess re-shared among
the others), choosing the inactive connections of largest momentum magnitude. Layer counts
change; the total never does (``dst.stats()`` shows each layer's count).

The momentum is the method's own running mean of the *dense* gradient,
m <- beta * m + (1 - beta) * g, updated at every step before the gradients are masked (the
optimizer's momentum is zero for inactive weights, which would leave nothing to grow by); for
active weights it is Adam's first moment, and SGD's momentum buffer up to a factor.
"""
from __future__ import annotations

import math

import torch

from ..core.selection import largest_k
from .base import Method, UpdateContext, register


def proportional_counts(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Integers summing to ``total``, proportional to ``weights``, each at most its cap.

    A share beyond its cap is fixed at the cap and the rest re-shared among the others;
    fractions go to the largest remainders (ties to the lower index). Equal shares when
    every open weight is zero. Needs ``total <= sum(caps)``.
    """
    counts = [0] * len(weights)
    remaining = total
    open_ = [i for i, c in enumerate(caps) if c > 0]
    while remaining > 0 and open_:
        w = [max(weights[i], 0.0) for i in open_]
        mass = sum(w)
        ideal = [remaining * (wi / mass if mass > 0 else 1.0 / len(open_)) for wi in w]
        full = [i for i, x in zip(open_, ideal) if x >= caps[i] - counts[i]]
        if full:
            for i in full:
                remaining -= caps[i] - counts[i]
                counts[i] = caps[i]
            open_ = [i for i in open_ if i not in full]
            continue
        floors = [math.floor(x) for x in ideal]
        left = remaining - sum(floors)
        order = sorted(range(len(open_)), key=lambda j: (-(ideal[j] - floors[j]), j))
        for j, i in enumerate(open_):
            counts[i] += floors[j]
        for j in order[:left]:
            counts[open_[j]] += 1
        remaining = 0
    return counts


@register
class SNFS(Method):
    name = "snfs"
    observes_gradients = True
    supports_nm = False   # it moves counts between layers; N:M fixes every group's count
    sparse_backend = False
    sparse_backend_refusal = "smooths the dense gradient of every weight, an out x in tensor the " \
                             "always-sparse backend never builds"

    def __init__(self, *, momentum: float = 0.9, grow_init: str = "zero"):
        super().__init__(grow_init=grow_init)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.buffers: dict[str, torch.Tensor] = {}
        self._round: dict[str, tuple[float, torch.Tensor, int]] = {}   # this update: mean |m|, dropped, cap

    def observe_gradients(self, targets) -> None:
        for t in targets:
            if not t.grad_available():
                continue
            g = t.dense_grad().reshape(-1).float()
            buf = self.buffers.get(t.name)
            if buf is None:
                buf = self.buffers[t.name] = torch.zeros(t.numel, device=g.device)
            buf.mul_(self.momentum).add_(g, alpha=1.0 - self.momentum)

    def _buffer(self, target) -> torch.Tensor:
        if target.name not in self.buffers:
            self.buffers[target.name] = torch.zeros(target.numel, device=target.device)
        return self.buffers[target.name]

    def update(self, target, ctx: UpdateContext) -> None:
        """Drop only; growth waits for every layer's drop count (after_update)."""
        active = target.active_indices()
        mean_momentum = float(self._buffer(target)[active].abs().mean()) if active.numel() else 0.0
        cap = target.numel - target.nnz   # grown connections must be inactive before the update
        k = self.rewire_count(target, ctx)
        drop = self.drop(target, k, ctx) if k > 0 else active[:0]
        if k > 0:
            target.rewire(drop, drop[:0], torch.zeros(0, device=target.device))
        self._round[target.name] = (mean_momentum, drop, cap)

    def after_update(self, targets, ctx: UpdateContext) -> None:
        layers = [t for t in targets if t.name in self._round]
        rounds = [self._round[t.name] for t in layers]
        self._round = {}
        total = sum(int(drop.numel()) for _, drop, _ in rounds)
        if total == 0:
            return
        regrow = proportional_counts(total, [m for m, _, _ in rounds], [cap for _, _, cap in rounds])
        for t, (_, dropped, _), r in zip(layers, rounds, regrow):
            if r == 0:
                continue
            inactive = t.inactive_indices()
            candidates = inactive[~torch.isin(inactive, dropped)]
            scores = self._buffer(t)[candidates].abs()
            grow = candidates[largest_k(scores, r, tie_keys=ctx.ties(t, candidates))]
            t.rewire(grow[:0], grow, self.grow_values(t, r, ctx.generator, positions=grow))

    def state_dict(self) -> dict:
        return {"buffers": {k: v.clone() for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {k: v.clone() for k, v in state["buffers"].items()}
