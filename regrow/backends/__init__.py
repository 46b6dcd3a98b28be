"""Execution backends: how a sparsified weight is stored and rewired.

``masked``: a dense parameter plus a bool mask (any nn.Module, GPU friendly).
``sparse``: values plus indices (``regrow.nn.SparseLinear``), nothing of size out x in.
Methods talk to both through :class:`regrow.backends.base.SparseTarget`.
"""
from ..layers import Sparsifiable
from ..optim_state import OptimizerStateMasker
from .base import SparseTarget
from .masked import MaskedTarget

__all__ = ["SparseTarget", "MaskedTarget", "make_target", "owns_topology"]


def owns_topology(found: Sparsifiable) -> bool:
    """Whether the parameter's module stores its weight sparsely and fixes its own count."""
    return hasattr(found.module, "make_regrow_target")


def make_target(found: Sparsifiable, budget: int, optimizer_state: OptimizerStateMasker) -> SparseTarget:
    """The backend target for one sparsifiable parameter.

    A module that stores its weight sparsely provides ``make_regrow_target(name, budget,
    optimizer_state)``; every other parameter is handled by the masked backend.
    """
    if owns_topology(found):
        return found.module.make_regrow_target(found.name, budget, optimizer_state)
    return MaskedTarget(found.name, found.param, found.module, budget, optimizer_state)
