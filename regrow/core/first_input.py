"""Records the shape of a model's first forward input (for methods that decide at step 1).

SynFlow scores the network on an all-ones input of the data's shape; the engine never sees a
batch, so a forward pre-hook on the model notes the shape of the first one and is removed
right after the decision.
"""
from __future__ import annotations

import torch
from torch import nn


class FirstInputShape:
    """A one-shot forward pre-hook: ``shape`` is the first input's shape (None until then)."""

    def __init__(self, model: nn.Module):
        self.shape: tuple | None = None
        self._handle = model.register_forward_pre_hook(self._record)

    def _record(self, module, args) -> None:
        if self.shape is None and args and isinstance(args[0], torch.Tensor):
            self.shape = tuple(args[0].shape)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
