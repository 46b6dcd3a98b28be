"""Top-KAST (Jayakumar et al., NeurIPS 2020): top-K always-sparse training.

The parameter is dense in principle; each layer's forward uses only its top-D weights by |w|
(A, the layer's budget), while gradients reach a larger top-(D+M) set B, A inside it, so that
weights just outside A keep learning and can enter it. The weights in B \\ A get the paper's
exploration penalty: the L2 term lambda * (sum_A w^2 + sum_{B\\A} w^2 / D) adds
2 lambda w to A's gradients and 2 lambda w / D to B \\ A's, D the layer's forward density.
At every update step (``update_interval``; ``drop_fraction`` is not used) A and B are
re-ranked from all values, so a weight whose |w| rose above A's smallest enters the forward.

Here: the model's parameter holds A (zeros elsewhere, as for every method); the method keeps
the other values (B \\ A, trained, and the stale ones outside B) in a dense tensor per layer.
Inside every ``step()``: B \\ A's values and unmasked gradients join the parameter for the
optimizer step (momentum and Adam moments of B \\ A are the optimizer's own) and leave it
right after, before the mask is re-applied; the forward and evaluation never see them. A weight
entering or leaving A starts with zero optimizer state (the engine's rule for rewired
weights). Masked backend only; the initial values are not rescaled (``sparse_init``).
"""
from __future__ import annotations

import torch

from ..core.flat import put_flat
from ..core.selection import largest_k
from .base import Method, UpdateContext, register
from .prune_at_init import dense_values


@register
class TopKAST(Method):
    name = "topkast"
    observes_gradients = True   # B \ A's gradients, read before the engine masks them
    sparse_backend = False
    sparse_backend_refusal = ("keeps dense values outside its forward set, which always-sparse "
                              "layers never hold")
    supports_nm = False
    rescales_init = False
    trains_outside_mask = True   # optimizer state outside A survives a checkpoint load

    def __init__(self, *, backward_extra: float | None = None, penalty: float = 1e-4):
        super().__init__(grow_init="zero")
        if backward_extra is not None and not 0.0 < backward_extra <= 1.0:
            raise ValueError(f"backward_extra must be in (0, 1], got {backward_extra}")
        if penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {penalty}")
        self.backward_extra, self.penalty = backward_extra, penalty
        self.latent: dict[str, torch.Tensor] = {}     # flat values outside A (zero on A)
        self.backward: dict[str, torch.Tensor] = {}   # flat bool: B

    def backward_count(self, target) -> int:
        """|B| = D + M weights; M defaults to D (B twice A), capped at the whole layer."""
        extra = target.budget if self.backward_extra is None else round(self.backward_extra * target.numel)
        return min(target.numel, target.budget + extra)

    def init_masks(self, targets, gen) -> None:
        for t in targets:
            theta = dense_values(t).float()   # every weight is still active: the dense init
            forward, backward = self._rank(t, theta, None)
            self.latent[t.name] = theta.masked_fill(forward, 0.0)
            self.backward[t.name] = backward
            t.set_mask(forward.view(t.rows, t.cols))

    def _rank(self, target, theta: torch.Tensor, ctx: UpdateContext | None):
        """A = top-D and B = top-(D+M) of |theta| (ties by the update's seeded hash)."""
        keys = None if ctx is None else ctx.ties(target, torch.arange(target.numel, device=theta.device))
        magnitude = theta.abs()
        forward = torch.zeros(target.numel, dtype=torch.bool, device=theta.device)
        forward[largest_k(magnitude, target.budget, tie_keys=keys)] = True
        backward = torch.zeros_like(forward)
        backward[largest_k(magnitude, self.backward_count(target), tie_keys=keys)] = True
        return forward, backward | forward

    def update(self, target, ctx: UpdateContext) -> None:
        latent = self.latent[target.name]
        was = target.mask.reshape(-1).to(latent.device)
        theta = dense_values(target).float().to(latent.device) + latent
        forward, backward = self._rank(target, theta, ctx)
        drop = (was & ~forward).nonzero().squeeze(1)
        grow = (forward & ~was).nonzero().squeeze(1)
        latent[drop] = theta[drop]
        values = theta[grow]
        latent[grow] = 0.0
        self.backward[target.name] = backward
        if drop.numel() or grow.numel():
            target.rewire(drop, grow, values)

    def step_gradient_fraction(self, target) -> float:
        """|B \\ A| / numel: the weight gradients every step computes beyond the forward set
        (for the FLOPs count; the papers count Top-KAST's backward over B)."""
        return int((self.backward[target.name] & ~target.mask.reshape(-1)).sum()) / target.numel

    def trained_outside_mask(self, target) -> torch.Tensor:
        """Every weight outside A: B \\ A is trained, and a weight that left B keeps its optimizer
        state for when it returns (the dense parameter of the paper)."""
        return (~target.mask.reshape(-1)).nonzero().squeeze(1)

    def _extra(self, target) -> torch.Tensor:
        """B \\ A: trained, never in the forward."""
        return (self.backward[target.name] & ~target.mask.reshape(-1)).nonzero().squeeze(1)

    def observe_gradients(self, targets) -> None:
        """Nothing to keep: the engine's snapshot of this step's gradient is read below."""

    def before_optimizer(self, targets) -> None:
        for t in targets:
            if t.param.grad is None or not t.grad_available():
                continue
            forward = t.mask.reshape(-1)
            density = t.budget / t.numel
            extra = self._extra(t)
            active = forward.nonzero().squeeze(1)
            with torch.no_grad():
                values = self.latent[t.name][extra].to(t.param.dtype)
                put_flat(t.param.data, extra, values)
                grad = t.dense_grad().reshape(-1)[extra] + (2 * self.penalty / density) * values
                put_flat(t.param.grad, extra, grad.to(t.param.grad.dtype))
                if self.penalty:
                    w = t.param.detach().reshape(-1)[active]
                    g = t.param.grad.reshape(-1)[active] + 2 * self.penalty * w
                    put_flat(t.param.grad, active, g.to(t.param.grad.dtype))

    def after_optimizer(self, targets) -> None:
        for t in targets:
            if t.param.grad is None or not t.grad_available():
                continue
            extra = self._extra(t)
            self.latent[t.name][extra] = t.param.detach().reshape(-1)[extra].float()

    def state_dict(self) -> dict:
        return {"latent": {k: v.clone() for k, v in self.latent.items()},
                "backward": {k: v.clone() for k, v in self.backward.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.latent = {k: v.clone() for k, v in state["latent"].items()}
        self.backward = {k: v.clone() for k, v in state["backward"].items()}
