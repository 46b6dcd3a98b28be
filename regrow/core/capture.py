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
