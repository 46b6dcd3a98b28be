"""MEST (Yuan et al., NeurIPS 2021), Elastic Mutation: drop by |w| + lambda |g|, grow at random.

Each update drops the k active weights of smallest importance |w| + lambda |dL/dw| (the update
step's gradient; only active weights are read, so it runs on the always-sparse backend too)
and grows k inactive connections uniformly at random, at zero (the authors' default
``--sp-update-init-method zero``). This follows the authors' code (github.com/boone891214/MEST,
``prune_utils/utils_pr.py::weight_pruning`` and ``weight_growing``; their lambda flag
``--sp-lmd`` defaults to 0, pure magnitude; our default 1e-2 keeps the gradient term in play).

``mutation_schedule="mest"`` replaces the engine's drop-fraction decay by the step schedule of
the authors' scripts (prune-to bounds 0.92-0.91-0.9 over grow-to 0.9 with decays at epochs 90
and 120 of 160): the full drop fraction until 9/16 of training, half of it until 3/4, none
after. ``"engine"`` (default) uses ``drop_schedule``.
"""
from __future__ import annotations

from ..core.selection import smallest_k
from .base import UpdateContext, register
from .set import SET

MUTATION_SCHEDULES = ("engine", "mest")


@register
class MEST(SET):
    name = "mest"
    needs_grad = True
    sparse_backend = True

    def __init__(self, *, lam: float = 1e-2, mutation_schedule: str = "engine", grow_init: str = "zero"):
        super().__init__(grow_init=grow_init)
        if lam < 0:
            raise ValueError(f"mest needs lam >= 0, got {lam}")
        if mutation_schedule not in MUTATION_SCHEDULES:
            raise ValueError(f"unknown mutation_schedule '{mutation_schedule}'; choose one of "
                             f"{', '.join(MUTATION_SCHEDULES)}")
        self.lam, self.mutation_schedule = lam, mutation_schedule
        self.schedule = None

    def plan(self, schedule) -> None:
        self.schedule = schedule

    def rewire_count(self, target, ctx: UpdateContext) -> int:
        if self.mutation_schedule == "engine":
            return super().rewire_count(target, ctx)
        total = self.schedule.total_steps
        level = 1.0 if ctx.step < 9 / 16 * total else 0.5 if ctx.step < 3 / 4 * total else 0.0
        return min(int(level * self.schedule.drop_fraction * target.nnz), target.numel - target.nnz)

    def drop(self, target, k: int, ctx: UpdateContext | None = None):
        """The k active weights of smallest |w| + lambda |dL/dw|."""
        active = target.active_indices()
        importance = target.active_values().abs().float() + self.lam * target.grad_at(active).abs().float()
        keys = None if ctx is None else ctx.ties(target, active)
        return active[smallest_k(importance, k, tie_keys=keys)]
