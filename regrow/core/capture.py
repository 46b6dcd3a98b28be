"""Records a linear layer's inputs h and output gradients delta for one training step.

Growth criteria that work from the factorised gradient dL/dW[o, i] = sum_b delta[b, o] h[b, i]
(GSE's subset gradients, GraBo and GraEst sampling) need h and delta of the update step's
batch only; the capture is armed just before that step's forward and disarmed after it.

The forward hook itself is registered once, when the capture is made, and does nothing while
disarmed: ``torch.compile`` does not see hooks added after a model's first compiled call, so a
hook added only at the update step would silently capture nothing in a compiled model.
"""
from __future__ import annotations

import torch
from torch import nn


class ActivationCapture:
    """Forward/backward hooks on one module that keep ``(h, delta)`` of the armed step."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._armed = False
        self._inputs: list[torch.Tensor] = []
        self._grads: dict[int, torch.Tensor] = {}
        self._handle = module.register_forward_hook(self._on_forward)

    def arm(self) -> None:
        self._armed = True

    def disarm(self) -> None:
        self._armed = False
        self._inputs, self._grads = [], {}

    def remove(self) -> None:
        """Disarm and take the hook off the module (its engine is closed or gone)."""
        self.disarm()
        self._handle.remove()

    def _on_forward(self, module, inputs, output) -> None:
        if not self._armed:
            return
        if not torch.is_grad_enabled() or not output.requires_grad:
            return  # an evaluation pass between training steps: not the update batch
        call = len(self._inputs)
        x = inputs[0].detach()
        self._inputs.append(x.reshape(-1, x.shape[-1]))

        def keep_grad(g: torch.Tensor, call: int = call) -> None:
            self._grads[call] = g.detach().reshape(-1, g.shape[-1])

        output.register_hook(keep_grad)

    def pair(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(h [B, in], delta [B, out])`` over every call of the armed step, or None."""
        if not self._inputs or len(self._grads) != len(self._inputs):
            return None
        h = torch.cat(self._inputs)
        delta = torch.cat([self._grads[i] for i in range(len(self._inputs))])
        return h, delta


def check_captured(targets) -> None:
    """Raise when an update step that reads activations captured them for none of the layers.

    A layer whose module is not called by its parent (nn.MultiheadAttention's out_proj) falls
    back to its dense gradient's marginals by design; every layer coming back empty means the
    hooks never ran, which is what a model compiled before the hooks existed does.
    """
    expected = [t for t in targets if t.captures_activations and t.grad_available()]
    if expected and all(t.activations() is None for t in expected):
        raise RuntimeError(
            f"regrow: no layer inputs/output gradients were captured at this update step (none of "
            f"{len(expected)} layers, e.g. '{expected[0].name}'): the forward hooks did not run. Under torch.compile, "
            "build DynamicSparsity before the compiled model's first call, or call torch._dynamo.reset() "
            "after building it")
