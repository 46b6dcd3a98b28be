"""Records a linear layer's inputs h and output gradients delta for one training step.

Growth criteria that work from the factorised gradient dL/dW[o, i] = sum_b delta[b, o] h[b, i]
(GSE's subset gradients, GraBo and GraEst sampling) need h and delta of the update step's
batch only; hooks are armed just before that step's forward and removed after it.
"""
from __future__ import annotations

import torch
from torch import nn


class ActivationCapture:
    """Forward/backward hooks on one module that keep ``(h, delta)`` of the armed step."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._handle = None
        self._inputs: list[torch.Tensor] = []
        self._grads: dict[int, torch.Tensor] = {}

    def arm(self) -> None:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._on_forward)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._inputs, self._grads = [], {}

    def _on_forward(self, module, inputs, output) -> None:
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
