"""Sparse layers.

- ``SparseLinear``: always-sparse training layer (values + indices, no out x in tensor ever).
- ``sparsify`` / ``sparse_mlp``: convert or build MLPs with SparseLinear layers.
- ``CondensedLinear``: constant fan-in inference layer (SRigL's condensed form).
- ``CSRLinear``: unstructured sparse inference layer (torch.sparse_csr).
"""
from .condensed import CondensedLinear, CSRLinear
from .sparse_linear import SparseLinear
from .sparsify import sparse_mlp, sparsify

__all__ = ["CondensedLinear", "CSRLinear", "SparseLinear", "sparse_mlp", "sparsify"]
