"""Execution backends: how a sparsified weight is stored and rewired.

``masked``: a dense parameter plus a bool mask (any nn.Module, GPU friendly).
``sparse``: values plus indices (``regrow.nn.SparseLinear``), nothing of size out x in.
Methods talk to both through :class:`regrow.backends.base.SparseTarget`.
"""
from .base import SparseTarget
from .masked import MaskedTarget

__all__ = ["SparseTarget", "MaskedTarget"]
