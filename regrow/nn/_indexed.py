"""What SparseLinear and SparseConv2d share: a weight stored as its active entries only.

``values`` [N] (the one parameter) plus int32 ``row_indices`` / ``col_indices`` sorted by (row,
col), over the weight viewed as ``rows x cols`` (a conv kernel's input channels and taps are
flattened into ``cols``). The layer says what ``rows`` and ``cols`` are; this mixin gives the
counts, the flat keys, the dense view for tests and export, and in-place rewiring / loading
with a different N.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _resize_parameter(param: nn.Parameter, data: torch.Tensor) -> None:
    """``param.data = data`` for data of another shape (N changed: SRigL's ablation, a load).

    The parameter's gradient accumulator remembers the old shape, and a graph still alive from
    the previous step (the loop's last ``loss``) keeps it alive, so the next backward would fail
    ("invalid gradient ... got [N'] but expected [N]"). torch drops the accumulator when the
    data's dtype changes, not its shape: pass through an empty tensor of another dtype first.
    """
    other = torch.float64 if data.dtype != torch.float64 else torch.float32
    param.data = torch.empty(0, dtype=other, device=data.device)
    param.data = data


class IndexedWeights:
    """Mixin for an ``nn.Module`` holding ``values``, ``row_indices``, ``col_indices`` and a
    cached topology ``_topo``; the class defines ``rows`` and ``cols``, and ``_capture_type``:
    what records one armed step's inputs and output gradients (read by the sparse backend)."""

    rows: int
    cols: int
    _capture_type: type
    _capture = None
    _armed = False

    # -- used by the sparse backend --------------------------------------------------------
    def arm_capture(self) -> None:
        """Record inputs and output gradients of the next training forward/backward."""
        self._armed = True
        self._capture = self._capture_type()

    def disarm_capture(self) -> None:
        self._armed = False
        self._capture = None

    def _capture_for_forward(self):
        """The record this forward adds to: only an armed training forward that computes the
        values' gradient (not an evaluation pass between steps)."""
        if self._armed and torch.is_grad_enabled() and self.values.requires_grad:
            return self._capture
        return None

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / (self.rows * self.cols)

    def init_bound(self) -> float:
        """1/sqrt(mean fan-in): the bound of initial (and randomly regrown) values."""
        return 1.0 / math.sqrt(max(1.0, self.nnz / self.rows))

    def active_keys(self) -> torch.Tensor:
        """Flat indices ``row * cols + col`` of the active weights, sorted (int64)."""
        return self.row_indices.long() * self.cols + self.col_indices.long()

    def dense_matrix(self) -> torch.Tensor:
        """The weight as a dense ``rows x cols`` tensor (allocates it: small layers only)."""
        w = torch.zeros(self.rows, self.cols, dtype=self.values.dtype, device=self.values.device)
        w[self.row_indices.long(), self.col_indices.long()] = self.values.detach()
        return w

    @torch.no_grad()
    def _assign(self, row: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the topology (sorted by (row, col)) and values; keeps the Parameter object
        so optimizers keep holding it (in place when N is unchanged)."""
        dev = self.values.device
        self.row_indices = row.to(device=dev, dtype=torch.int32).contiguous()
        self.col_indices = col.to(device=dev, dtype=torch.int32).contiguous()
        values = values.to(device=dev, dtype=self.values.dtype)
        if values.shape == self.values.shape:
            self.values.copy_(values)
        else:
            _resize_parameter(self.values, values.contiguous())
        self._topo = None

    # -- checkpoints with a different N ----------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        vals = state_dict.get(prefix + "values")
        if vals is not None and vals.shape != self.values.shape:
            # a checkpoint of the same layer after a drop-only update: resize before copying
            with torch.no_grad():
                _resize_parameter(self.values, torch.empty_like(vals, device=self.values.device, dtype=self.values.dtype))
            n = vals.numel()
            self.row_indices = torch.empty(n, dtype=torch.int32, device=self.values.device)
            self.col_indices = torch.empty(n, dtype=torch.int32, device=self.values.device)
        self._topo = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
