"""Sparse layers (minimal init; the nn package owner replaces this)."""
from .condensed import CondensedLinear, CSRLinear
from .sparse_linear import SparseLinear
from .sparsify import sparse_mlp, sparsify

__all__ = ["CondensedLinear", "CSRLinear", "SparseLinear", "sparse_mlp", "sparsify"]
