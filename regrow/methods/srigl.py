"""SRigL (Lasby et al., 2023): RigL with constant fan-in and neuron ablation.

Every active output neuron (conv: output channel) keeps the same number of active inputs.
Per update: the weights RigL would keep (after magnitude drop) plus those it would grow
(top |grad|) are *salient*; a neuron with fewer than ``gamma_sal * fan_in`` salient weights is
ablated and its budget is shared among the survivors (their fan-in rises to
floor(total / active), so the layer holds fan_in * active weights, short of the initial total
by less than one weight per active neuron). Each surviving neuron then keeps
its largest-|w| weights and regrows by largest |grad| up to the new fan-in.
"""
from __future__ import annotations

import math

import torch

from ..core.selection import largest_k, smallest_k
from .base import Method, UpdateContext, register

# Per-row choice priority: kept weights first, then the best new candidates, and a
# weight dropped by magnitude only when a row has nothing else left to take.
_KEPT, _NEW, _DROPPED = 2, 1, 0


@register
class SRigL(Method):
    name = "srigl"
    needs_grad = True
    sparse_backend = False

    def __init__(self, *, gamma_sal: float = 0.3, ablation: bool = True, grow_init: str = "zero"):
        super().__init__(grow_init=grow_init)
        if not 0.0 <= gamma_sal <= 1.0:
            raise ValueError(f"gamma_sal must be in [0, 1], got {gamma_sal}")
        self.gamma_sal, self.ablation = gamma_sal, ablation
        self.totals: dict[str, int] = {}   # fan_in * rows at init: the budget ablation redistributes

    def init_masks(self, targets, gen):
        for t in targets:
            fan_in = min(t.cols, max(1, round(t.budget / t.rows)))
            order = torch.rand(t.rows, t.cols, generator=gen).argsort(dim=1)
            mask = torch.zeros(t.rows, t.cols, dtype=torch.bool)
            mask.scatter_(1, order[:, :fan_in], True)
            t.set_mask(mask)
            self.totals[t.name] = fan_in * t.rows

    def update(self, target, ctx: UpdateContext) -> None:
        rows, cols = target.rows, target.cols
        k = self.rewire_count(target, ctx)
        if k <= 0:
            return
        active = target.active_indices()
        values = target.active_values()
        weight = torch.zeros(target.numel, device=target.device, dtype=values.dtype)
        weight[active] = values.abs()
        was_active = torch.zeros(target.numel, dtype=torch.bool, device=target.device)
        was_active[active] = True
        grad = target.dense_grad().abs().reshape(-1).to(weight.dtype)

        # RigL's unstructured decision, used to measure each neuron's saliency
        dropped = active[smallest_k(weight[active], k)]
        inactive = (~was_active).nonzero().squeeze(1)
        would_grow = inactive[largest_k(grad[inactive], k)]
        salient = was_active.clone()
        salient[dropped] = False
        kept = salient.clone()
        salient[would_grow] = True

        alive = self._surviving_neurons(target, salient.view(rows, cols).sum(1))
        fan_in = min(cols, self.totals[target.name] // int(alive.sum()))

        # rank each row: kept (by |w|) > never-active candidates (by |grad|) > dropped (by |w|)
        klass = torch.full((target.numel,), _NEW, device=target.device)
        klass[was_active] = _DROPPED
        klass[kept] = _KEPT
        score = torch.where(klass == _NEW, grad, weight).view(rows, cols)
        by_score = score.argsort(dim=1, descending=True, stable=True)
        by_class = klass.view(rows, cols).gather(1, by_score).argsort(dim=1, descending=True, stable=True)
        chosen = by_score.gather(1, by_class)[:, :fan_in]
        new_mask = torch.zeros(rows, cols, dtype=torch.bool, device=target.device)
        new_mask.scatter_(1, chosen, True)
        new_mask[~alive] = False
        new_mask = new_mask.view(-1)

        drop = (was_active & ~new_mask).nonzero().squeeze(1)
        grow = (~was_active & new_mask).nonzero().squeeze(1)
        target.rewire(drop, grow, self.grow_values(target, grow.numel(), ctx.generator))
        counts = target.row_counts()
        assert bool(((counts == 0) | (counts == fan_in)).all()), "srigl fan-in must be constant"

    def _surviving_neurons(self, target, salient_per_row: torch.Tensor) -> torch.Tensor:
        """Neurons kept active; enough of them survive that fan-in never exceeds ``cols``."""
        rows, cols = target.rows, target.cols
        total = self.totals[target.name]
        if not self.ablation:
            return torch.ones(rows, dtype=torch.bool, device=salient_per_row.device)
        fan_in = target.nnz / max(1, int((target.row_counts() > 0).sum()))
        alive = salient_per_row >= self.gamma_sal * fan_in
        needed = max(1, math.ceil(total / cols))
        if int(alive.sum()) < needed:
            alive = torch.zeros_like(alive)
            alive[largest_k(salient_per_row.float(), needed)] = True
        return alive

    def state_dict(self) -> dict:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.totals = dict(state["totals"])
