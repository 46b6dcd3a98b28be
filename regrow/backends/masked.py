"""Masked backend: the weight stays a dense parameter and a bool mask marks active entries."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..core.capture import ActivationCapture
from ..core.flat import and_bits_, keep_bits, put_flat
from ..core.optim_state import OptimizerStateMasker
from ..core.target import SparseTarget


class MaskedTarget(SparseTarget):
    """A dense ``nn.Parameter`` with a bool mask of its shape.

    Gradients are read from a snapshot taken at the update step (before the optimizer
    consumes them); inputs and output gradients come from hooks on nn.Linear modules.
    """

    def __init__(self, name: str, param: nn.Parameter, module: nn.Module, budget: int,
                 optimizer_state: OptimizerStateMasker):
        self.name = name
        self.param = param
        self.module = module
        self.budget = int(budget)
        self.rows = param.shape[0]
        self.cols = param.numel() // max(param.shape[0], 1)
        self._optimizer_state = optimizer_state
        self._mask = torch.ones(param.shape, dtype=torch.bool, device=param.device)
        self._keep = keep_bits(self._mask, param)   # masking runs every step: see regrow.flat
        self.ever_active = torch.zeros_like(self._mask)
        # h and delta of a Linear describe its weight only (not its bias or extra parameters)
        is_weight = isinstance(module, nn.Linear) and param is module.weight
        self.capture = ActivationCapture(module) if is_weight else None
        self.captures_activations = self.capture is not None
        self._grad: torch.Tensor | None = None

    # -- reading -------------------------------------------------------------------------
    @property
    def mask(self) -> torch.Tensor:
        return self._mask

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    @property
    def device(self) -> torch.device:
        return self.param.device

    def active_indices(self) -> torch.Tensor:
        return self.mask.view(-1).nonzero().squeeze(1)

    def active_values(self) -> torch.Tensor:
        return self.param.detach().reshape(-1)[self.active_indices()]

    def is_active(self, flat: torch.Tensor) -> torch.Tensor:
        return self.mask.view(-1)[flat]

    def inactive_indices(self) -> torch.Tensor:
        return (~self._mask).view(-1).nonzero().squeeze(1)

    def grad_at(self, flat: torch.Tensor) -> torch.Tensor:
        return self.dense_grad().view(-1)[flat]

    def dense_grad(self) -> torch.Tensor:
        if self._grad is None:
            raise RuntimeError(f"no gradient was captured for '{self.name}' at this step")
        return self._grad.view(self.rows, self.cols)

    def activations(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.capture.pair() if self.capture is not None else None

    def row_counts(self) -> torch.Tensor:
        return self.mask.view(self.rows, self.cols).sum(1)

    def ever_active_count(self) -> int:
        return int(self.ever_active.sum())

    def fan_in_bound(self) -> float:
        # nn.Linear / nn.ConvNd default init (kaiming_uniform with a=sqrt(5)) is U(-b, b), b = 1/sqrt(fan_in)
        return 1.0 / math.sqrt(self.cols)

    # -- per-step work -------------------------------------------------------------------
    def snapshot_grad(self) -> None:
        g = self.param.grad
        self._grad = None if g is None else g.detach().clone(memory_format=torch.contiguous_format)

    def grad_available(self) -> bool:
        return self._grad is not None

    def arm_capture(self) -> None:
        if self.capture is not None:
            self.capture.arm()

    def release(self) -> None:
        self._grad = None
        if self.capture is not None:
            self.capture.disarm()

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.remove()

    def grad_is_finite(self) -> bool:
        g = self.param.grad
        return g is None or bool(torch.isfinite(g).all())

    @torch.no_grad()
    def mask_grad(self) -> None:
        if self.param.grad is not None:
            and_bits_(self.param.grad, self._keep)

    @torch.no_grad()
    def apply_mask(self) -> None:
        and_bits_(self.param.data, self._keep)

    # -- changing the topology -----------------------------------------------------------
    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the whole mask (initialisation and checkpoint loading)."""
        self._mask = mask.to(device=self.param.device, dtype=torch.bool).reshape(self.param.shape).contiguous().clone()
        self._keep = keep_bits(self._mask, self.param)
        self.ever_active |= self.mask
        self.apply_mask()
        self._optimizer_state.zero_inactive(self.param, self.mask)

    def restart_exploration(self) -> None:
        self.ever_active = self.mask.clone()

    @torch.no_grad()
    def rewire(self, drop: torch.Tensor, grow: torch.Tensor, grow_values: torch.Tensor) -> None:
        mask, keep = self._mask.view(-1), self._keep.view(-1)
        mask[drop], keep[drop] = False, 0
        mask[grow], keep[grow] = True, -1
        put_flat(self.param.data, drop, 0)
        put_flat(self.param.data, grow, grow_values.to(self.param.dtype))
        self.ever_active.view(-1)[grow] = True
        self._optimizer_state.zero_entries(self.param, torch.cat([drop, grow]))

    def state_dict(self) -> dict:
        return {"mask": self.mask.clone(), "ever_active": self.ever_active.clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["mask"].shape) != tuple(self.param.shape):
            raise ValueError(f"checkpoint mask for '{self.name}' has shape {tuple(state['mask'].shape)}, "
                             f"the parameter has {tuple(self.param.shape)}")
        self.ever_active = state["ever_active"].to(self.param.device, torch.bool).clone()
        self.set_mask(state["mask"])
