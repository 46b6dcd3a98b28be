"""Keeps optimizer state consistent with the masks.

Pruned weights lose their state and grown weights start from zero state. regrow knows the
state layout of SGD, Adam and AdamW (and their subclasses): every state tensor shaped like
its parameter (momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq) is per-weight and is
zeroed where a weight is inactive; scalar state such as Adam's ``step`` is shared and kept.
"""
from __future__ import annotations

import torch

from .flat import put_flat

SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def check_optimizer(optimizer: torch.optim.Optimizer, allow_any: bool) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not allow_any and not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        names = ", ".join(c.__name__ for c in SUPPORTED_OPTIMIZERS)
        raise ValueError(
            f"regrow keeps optimizer state consistent for {names} (and subclasses), not "
            f"{type(optimizer).__name__}; pass allow_any_optimizer=True to zero every state "
            "tensor shaped like its parameter instead")


def per_weight_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's state tensors shaped like ``param`` (momentum, Adam's moments)."""
    return [v for v in optimizer.state.get(param, {}).values()
            if isinstance(v, torch.Tensor) and v.shape == param.shape]


class OptimizerStateMasker:
    """Zeroes the per-weight optimizer state of given entries of a parameter."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def _per_weight_state(self, param: torch.Tensor) -> list[torch.Tensor]:
        state = self.optimizer.state.get(param, {})
        return [v for v in state.values()
                if isinstance(v, torch.Tensor) and v.shape == param.shape]

    @torch.no_grad()
    def zero_entries(self, param: torch.Tensor, flat: torch.Tensor) -> None:
        for buf in self._per_weight_state(param):
            put_flat(buf, flat.to(buf.device), 0)

    @torch.no_grad()
    def zero_inactive(self, param: torch.Tensor, mask: torch.Tensor) -> None:
        for buf in self._per_weight_state(param):
            buf.masked_fill_(~mask, 0)
