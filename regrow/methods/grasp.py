"""GraSP (Wang et al., ICLR 2020): keep the weights that preserve gradient flow.

Score S = -w * (H g), with H g the Hessian-gradient product of the first batch's loss, by
double backprop: g = dL/dw with its graph, then H g = d(g . stop_grad(g))/dw. The weights with
the *largest* S are removed (the authors' code keeps S <= threshold), i.e. those with the
largest w * H g are kept. Needs ``dst.step(closure=lambda: loss_fn(model(x), y))`` at the first
step: the engine cannot redo the user's forward with a graph. The authors divide the logits by
a temperature (200) inside their loss; here the closure's loss is used as given.
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import register
from .prune_at_init import PruneAtInit, dense_values, parameters_of


@register
class GraSP(PruneAtInit):
    name = "grasp"

    def scores(self, targets, first):
        if first.closure is None:
            raise ValueError("grasp needs the first batch's loss: call dst.step(closure=lambda: "
                             "loss_fn(model(x), y)) at the first step")
        params = parameters_of(targets, first.model)
        # the math attention kernel is the one with a second derivative (flash has none on CPU)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            loss = first.closure()
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            used = [(p, g) for p, g in zip(params, grads) if g is not None]
            z = sum((g * g.detach()).sum() for _, g in used)
            hg = torch.autograd.grad(z, [p for p, _ in used], allow_unused=True)
        by_param = {id(p): h for (p, _), h in zip(used, hg)}
        out = {}
        for t, p in zip(targets, params):
            h = by_param.get(id(p))
            w = dense_values(t)
            # keep the largest w * Hg = remove the largest S = -w * Hg
            out[t.name] = torch.zeros_like(w) if h is None else w * h.detach().reshape(-1).to(w.dtype)
        return out
