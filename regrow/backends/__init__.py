"""Execution backends: how a sparsified weight is stored and rewired.

``masked``: a dense parameter plus a bool mask (any nn.Module, GPU friendly).
``sparse``: values plus indices (``regrow.nn.SparseLinear``), nothing of size out x in.
Methods talk to both through :class:`regrow.backends.base.SparseTarget`.
"""
from ..layers import Sparsifiable
from ..optim_state import OptimizerStateMasker
from .base import SparseTarget
from .masked import MaskedTarget

__all__ = ["SparseTarget", "MaskedTarget", "make_target"]


def make_target(found: Sparsifiable, budget: int, optimizer_state: OptimizerStateMasker) -> SparseTarget:
    """The backend target for one sparsifiable parameter.

    A module that stores its weight sparsely provides ``make_regrow_target(name, budget,
    optimizer_state)``; every other parameter is handled by the masked backend.
    """
    factory = getattr(found.module, "make_regrow_target", None)
    if factory is not None:
        return factory(found.name, budget, optimizer_state)
    return MaskedTarget(found.name, found.param, found.module, budget, optimizer_state)
