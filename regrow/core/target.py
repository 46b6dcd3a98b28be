"""The interface every method uses to read and rewire one sparsified weight.

A weight is seen as a matrix of ``rows`` output neurons by ``cols`` inputs (a conv kernel's
input channels and spatial taps are flattened into ``cols``). Connections are addressed by
*flat* indices ``row * cols + col`` (int64), which is row-major order for both backends.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class SparseTarget(ABC):
    """One sparsified weight, as the engine and the methods see it.

    Attributes:
        name: parameter name as in ``model.named_parameters()``.
        rows, cols: the weight viewed as ``[rows, cols]`` (rows are output neurons).
        budget: number of non-zeros the density allocation gave this weight.
    """

    name: str
    rows: int
    cols: int
    budget: int
    #: True when the layer chose its own initial topology (the engine then leaves it as is)
    preinitialised: bool = False
    #: True when grad_at works from captured (h, delta): armed before every update step
    grad_needs_capture: bool = False
    #: True when hooks on the layer's module capture ``(h, delta)`` at an armed update step
    captures_activations: bool = False

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    @abstractmethod
    def nnz(self) -> int:
        """Number of active connections."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device of the weight's values."""

    @abstractmethod
    def active_indices(self) -> torch.Tensor:
        """Flat indices of active connections, sorted ascending (int64)."""

    @abstractmethod
    def active_values(self) -> torch.Tensor:
        """Weight values of the active connections, aligned with :meth:`active_indices`."""

    @abstractmethod
    def is_active(self, flat: torch.Tensor) -> torch.Tensor:
        """Bool tensor: which of the flat indices are active."""

    def inactive_indices(self) -> torch.Tensor:
        """Flat indices of every inactive connection (O(rows x cols): masked backend only)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot enumerate all inactive connections of '{self.name}'")

    @abstractmethod
    def grad_at(self, flat: torch.Tensor) -> torch.Tensor:
        """dL/dw at the given flat indices, from the gradients captured at this update step."""

    def dense_grad(self) -> torch.Tensor:
        """The full ``[rows, cols]`` gradient (masked backend only)."""
        raise NotImplementedError(
            f"{type(self).__name__} never materialises the dense gradient of '{self.name}'")

    def grad_rows(self, start: int, stop: int) -> torch.Tensor:
        """dL/dW for output rows ``start:stop`` as a ``[stop - start, cols]`` tensor.

        What RigL-family growth reads, one block of rows at a time (regrow.core.row_blocks),
        so that no backend needs the whole ``[rows, cols]`` gradient at once. By default a slice
        of :meth:`dense_grad`; a backend without one computes the block from what it captured.
        """
        return self.dense_grad()[start:stop]

    def activations(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(h, delta)``: layer inputs ``[B, cols]`` and output gradients ``[B, rows]``
        captured at this update step, or None when not captured for this weight."""
        return None

    @abstractmethod
    def row_counts(self) -> torch.Tensor:
        """Active connections per output neuron ([rows], int64)."""

    @abstractmethod
    def rewire(self, drop: torch.Tensor, grow: torch.Tensor, grow_values: torch.Tensor) -> None:
        """Deactivate ``drop``, activate ``grow`` with ``grow_values``.

        Dropped weights become zero and lose their optimizer state; grown weights get
        ``grow_values`` and zero optimizer state. ``drop`` must be active and ``grow``
        inactive; the engine guarantees both are duplicate-free and disjoint.
        """

    @abstractmethod
    def ever_active_count(self) -> int:
        """How many distinct connections have been active at any time (for ITOP rate)."""

    def restart_exploration(self) -> None:
        """Count only the connections active now as explored: for a mask decided from a
        score pass over dense weights that were never trained (pruning at initialization),
        whose ITOP rate is then 1 - sparsity, as Liu et al. define it over the training masks."""
        raise NotImplementedError(f"{type(self).__name__} cannot restart its ITOP set")

    @abstractmethod
    def fan_in_bound(self) -> float:
        """Bound for a freshly initialised weight, as the layer's own init would use."""

    # -- per-step hooks the engine calls; no-ops unless a backend needs them -----------------
    def arm_capture(self) -> None:
        """The next forward/backward is an update step's: record ``(h, delta)``."""

    def snapshot_grad(self) -> None:
        """Keep this step's weight gradient for the topology update that follows."""

    def release(self) -> None:
        """Drop whatever was captured for the update step."""

    def detach(self) -> None:
        """Take off whatever the target attached to the model (hooks): its engine is closed."""

    def grad_is_finite(self) -> bool:
        return True

    def grad_available(self) -> bool:
        """False when the layer got no gradient this step (unused branch, frozen layer)."""
        return True

    def mask_grad(self) -> None:
        """Zero the gradient of inactive weights before the optimizer step."""

    def apply_mask(self) -> None:
        """Force inactive weights back to exactly zero after the optimizer step."""

    @property
    def mask(self) -> torch.Tensor:
        """Dense bool mask of the parameter's shape (may be costly for the sparse backend)."""
        raise NotImplementedError(f"{type(self).__name__} has no dense mask for '{self.name}'")

    @abstractmethod
    def state_dict(self) -> dict:
        ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        ...
