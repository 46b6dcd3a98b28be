"""Sparse layers.

- ``SparseLinear``: always-sparse training layer (values + indices, no out x in tensor ever).
- ``SparseConv2d``: always-sparse 2-D convolution (values + indices, no dense kernel ever).
- ``SparseMultiheadAttention``: attention with SparseLinear q/k/v/output projections.
- ``sparsify`` / ``sparse_mlp``: convert models (MLPs, transformers, CNNs) to these layers or build MLPs with SparseLinear layers.
- ``CondensedLinear``: constant fan-in inference layer (SRigL's condensed form).
- ``CSRLinear``: unstructured sparse inference layer (torch.sparse_csr).
"""
from .condensed import CondensedLinear, CSRLinear
from .sparse_conv import SparseConv2d
from .sparse_attention import SparseMultiheadAttention
from .sparse_linear import SparseLinear
from .sparsify import sparse_mlp, sparsify

__all__ = ["CondensedLinear", "CSRLinear", "SparseConv2d", "SparseLinear", "SparseMultiheadAttention", "sparse_mlp", "sparsify"]
