"""Execution backends: how a sparsified weight is stored and rewired.

``masked``: a dense parameter plus a bool mask (any nn.Module, GPU friendly).
``sparse``: values plus indices (``regrow.nn.SparseLinear``, ``regrow.nn.SparseConv2d``),
nothing of size out x in.
Methods talk to both through :class:`regrow.core.target.SparseTarget`.
"""
from ..core.layers import Sparsifiable
from ..core.optim_state import OptimizerStateMasker
from ..core.target import SparseTarget
from ..nn.sparse_conv import SparseConv2d
from ..nn.sparse_linear import SparseLinear
from .masked import MaskedTarget
from .sparse import SparseConv2dTarget, SparseLinearTarget

__all__ = ["SparseTarget", "MaskedTarget", "SparseLinearTarget", "SparseConv2dTarget", "make_target",
           "owns_topology"]

#: always-sparse layer types and the sparse backend's target for each
_SPARSE_TARGETS = {SparseLinear: SparseLinearTarget, SparseConv2d: SparseConv2dTarget}


def owns_topology(found: Sparsifiable) -> bool:
    """Whether the parameter's module stores its weight sparsely and fixes its own count."""
    return isinstance(found.module, tuple(_SPARSE_TARGETS)) or hasattr(found.module, "make_regrow_target")


def make_target(found: Sparsifiable, budget: int, optimizer_state: OptimizerStateMasker) -> SparseTarget:
    """The backend target for one sparsifiable parameter.

    ``regrow.nn.SparseLinear`` and ``regrow.nn.SparseConv2d`` get the sparse backend (their
    count is their own: ``budget`` is not used). Another layer that stores its weight sparsely
    can provide ``make_regrow_target(name, budget, optimizer_state)``; every other parameter is
    handled by the masked backend.
    """
    for layer_type, target_type in _SPARSE_TARGETS.items():
        if isinstance(found.module, layer_type):
            return target_type(found.name, found.module, optimizer_state)
    if hasattr(found.module, "make_regrow_target"):
        return found.module.make_regrow_target(found.name, budget, optimizer_state)
    return MaskedTarget(found.name, found.param, found.module, budget, optimizer_state)
