"""SparseLinear's CUDA kernels in Triton (optional: used when ``triton`` imports).

The layer keeps activations feature-major (``x^T [in, B]``, ``delta^T [out, B]``), so every
kernel gathers whole contiguous rows of B values by an index:

* :func:`spmm_rows`: ``out[r, :] = sum_j values[j] * src[idx[j], :] (+ bias[r])`` over the
  entries ``ptr[r] <= j < ptr[r+1]`` of row r. With the CSR structure it is the forward
  (``y^T = W x^T``); with the CSC view (entries of input column c, ``perm`` mapping them to
  their CSR positions) the input gradient (``dx^T = W^T delta^T``).
* :func:`sddmm`: ``out[j] = sum_b a[row[j], b] * b[col[j], b]``, the weight gradient at the
  layer's own entries (or at any list of pairs, GSE's candidates).

On CUDA these replace torch.sparse (cuSPARSE), whose SpMM and SDDMM cost about the same at
every sparsity at SparseLinear's sizes (``docs/gpu.md``). ``REGROW_CUDA_SPARSE=torch`` keeps
torch.sparse. On the CPU they run only under ``TRITON_INTERPRET=1`` (the tests' way to check
them without a GPU); the CPU route is the compiled C kernels.
"""
from __future__ import annotations

import os
import warnings

import torch

#: entries of a row (or pairs) handled per inner step, and the widest batch tile
_BLOCK_J, _MAX_BLOCK_B = 32, 128
_KERNELS: dict | None = None   # compiled on first use: importing regrow never imports Triton


def _kernels() -> dict:
    """The jitted kernels ({} when Triton does not import)."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from . import _triton_jit
        except ImportError:   # no Triton here
            _KERNELS = {}
        else:
            _KERNELS = _triton_jit.kernels()
    return _KERNELS


def route() -> str:
    """"triton" or "torch": which kernels SparseLinear uses on CUDA (``REGROW_CUDA_SPARSE``,
    default triton when it imports)."""
    asked = os.environ.get("REGROW_CUDA_SPARSE")
    wanted = (asked or "triton").strip().lower()
    if wanted not in ("triton", "torch"):
        raise ValueError(f"REGROW_CUDA_SPARSE must be 'triton' or 'torch', got {wanted!r}")
    if wanted == "torch" or _kernels():
        return wanted
    if asked is not None:   # asked for by name: say that it cannot be had (warnings shows it once)
        warnings.warn("regrow: REGROW_CUDA_SPARSE=triton but Triton does not import here; SparseLinear "
                      "uses torch.sparse (cuSPARSE) on CUDA", RuntimeWarning, stacklevel=2)
    return "torch"


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these float32 tensors go through the Triton kernels: on CUDA when the route is
    triton; on the CPU only under ``TRITON_INTERPRET=1`` with ``REGROW_CUDA_SPARSE=triton``."""
    if not all(t.dtype == torch.float32 for t in tensors):
        return False
    device = tensors[0].device.type
    if device == "cpu" and not (os.environ.get("TRITON_INTERPRET") == "1"
                                and os.environ.get("REGROW_CUDA_SPARSE") == "triton"):
        return False
    return device in ("cuda", "cpu") and route() == "triton"


def _block_b(batch: int) -> int:
    return min(_MAX_BLOCK_B, _kernels()["next_power_of_2"](max(1, batch)))


def spmm_rows(ptr: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, perm: torch.Tensor | None,
              src: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out [len(ptr) - 1, B]`` (contiguous) with ``out[r] = sum_j values[perm[j]] * src[idx[j]]``
    (+ ``bias[r]``) over row r's entries; ``src [K, B]`` contiguous."""
    rows, batch = ptr.numel() - 1, src.shape[1]
    src = src.contiguous()
    if out is None:
        out = torch.empty(rows, batch, dtype=src.dtype, device=src.device)
    if rows == 0 or batch == 0:
        return out
    block_b = _block_b(batch)
    k = _kernels()
    # the kernels read raw pointers: every index array must be contiguous (a strided view of
    # the layer's indices would be read as if it were not)
    ptr, idx = ptr.contiguous(), idx.contiguous()
    perm = None if perm is None else perm.contiguous()
    k["spmm_rows"][(rows, k["cdiv"](batch, block_b))](
        ptr, idx, values.contiguous(), perm if perm is not None else idx, src,
        bias if bias is not None else values, out, batch,
        HAS_PERM=perm is not None, HAS_BIAS=bias is not None, BLOCK_J=_BLOCK_J, BLOCK_B=block_b)
    return out


def sddmm(row: torch.Tensor, col: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[j] = sum_k a[row[j], k] * b[col[j], k]`` for ``a [R, B]``, ``b [C, B]``."""
    n, batch = row.numel(), a.shape[1]
    out = torch.empty(n, dtype=a.dtype, device=a.device)
    if n == 0:
        return out
    if batch == 0:
        return out.zero_()
    block_b = _block_b(batch)
    k = _kernels()
    k["sddmm"][(k["cdiv"](n, _BLOCK_J),)](row.contiguous(), col.contiguous(), a.contiguous(), b.contiguous(),
                                          out, n, batch,
                                          BLOCK_J=_BLOCK_J, BLOCK_B=block_b)
    return out
