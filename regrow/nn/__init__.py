"""Sparse layers (minimal init; the nn package owner replaces this)."""
from .condensed import CondensedLinear, CSRLinear

__all__ = ["CondensedLinear", "CSRLinear"]
