"""Compiled CPU kernels for ``SparseLinear`` (values + indices, unstructured sparsity).

Three loops do all the work of an always-sparse layer, each O(B * nnz) with nothing of size
out x in:

* ``spmm_rows``: ``out[r, :] = bias[r] + sum_j w[j] * src[idx[j], :]`` over a CSR-like row
  pointer. With ``src = x^T`` ([in, B]) it is the forward pass; with the transposed (CSC)
  index and ``src = grad_y^T`` it is the input gradient. Activations are kept feature-major
  ([features, B]) so each non-zero is one contiguous B-wide multiply-add that the compiler
  holds in vector registers (the layout SparseProp also uses).
* ``sddmm``: ``out[j] = <a[r[j], :], b[c[j], :]>``: the weight gradient of the active entries
  (``a = grad_y^T``, ``b = x^T``), and GSE's gradients of sampled candidate pairs.

Two helpers for topology updates avoid sorting, which costs about 0.2 us per int64 element
here (0.46 s for 2M keys on one thread): ``locate`` (position of flat keys, a binary search in the
row's own column segment) and ``csc_perm`` (counting sort of the entries by column).

The C source is compiled once with the system compiler into a per-user cache and called
through ``ctypes`` (building, caching and the environment variables are shared with the
condensed kernel in :mod:`regrow.nn._cbuild`); building a torch C++ extension instead costs
about 25 s of compile time on this 2-core machine for no benefit, since the loops need only
raw pointers. If anything fails (no compiler, an unusable cache folder,
``REGROW_DISABLE_KERNEL=1``, a non-float32 or non-CPU tensor), callers fall back to
``torch.sparse`` (CSR matmul and ``sampled_addmm``), which gives the same results.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from . import _cbuild

_SOURCE = r"""
#include <stdint.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
#define LD(p) (*(const v16 *)(p))
#define ST(p, v) (*(v16 *)(p) = (v))

/* Rows of src are gathered at random: prefetch the row PF non-zeros ahead, which turns the
   gathers from latency-bound into bandwidth-bound once src outgrows the caches. */
#define PF 8

/* One row of spmm over NV * 16 consecutive batch columns, accumulators in registers. */
#define DEFINE_TILE(NV)                                                                         \
static inline void tile##NV(int64_t s, int64_t e, const int32_t *idx, const float *w,           \
                            const int32_t *wperm, const float *src, int64_t B, float b0,        \
                            float *o) {                                                         \
    v16 acc[NV];                                                                                \
    for (int u = 0; u < NV; ++u) acc[u] = (v16){0} + b0;                                        \
    for (int64_t j = s; j < e; ++j) {                                                           \
        if (j + PF < e) {                                                                       \
            const float *nx = src + (int64_t)idx[j + PF] * B;                                   \
            for (int u = 0; u < NV; ++u) __builtin_prefetch(nx + 16 * u);                       \
        }                                                                                       \
        const float wj = wperm ? w[wperm[j]] : w[j];                                            \
        const float *x = src + (int64_t)idx[j] * B;                                             \
        for (int u = 0; u < NV; ++u) acc[u] += wj * LD(x + 16 * u);                             \
    }                                                                                           \
    for (int u = 0; u < NV; ++u) ST(o + 16 * u, acc[u]);                                        \
}
DEFINE_TILE(8)
DEFINE_TILE(4)
DEFINE_TILE(1)

void spmm_rows(int64_t n_rows, int64_t B, const int64_t *ptr, const int32_t *idx,
               const float *w, const int32_t *wperm, const float *src, const float *bias,
               float *out, int nthreads) {
    #pragma omp parallel for schedule(dynamic, 32) num_threads(nthreads)
    for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t s = ptr[r], e = ptr[r + 1];
        const float b0 = bias ? bias[r] : 0.0f;
        float *o = out + r * B;
        int64_t t = 0;
        for (; t + 128 <= B; t += 128) tile8(s, e, idx, w, wperm, src + t, B, b0, o + t);
        for (; t + 64 <= B; t += 64) tile4(s, e, idx, w, wperm, src + t, B, b0, o + t);
        for (; t + 16 <= B; t += 16) tile1(s, e, idx, w, wperm, src + t, B, b0, o + t);
        for (; t < B; ++t) {
            float acc = b0;
            for (int64_t j = s; j < e; ++j)
                acc += (wperm ? w[wperm[j]] : w[j]) * src[(int64_t)idx[j] * B + t];
            o[t] = acc;
        }
    }
}

void sddmm(int64_t n, int64_t B, const int32_t *r, const int32_t *c, const float *a,
           const float *b, float *out, int nthreads) {
    #pragma omp parallel for schedule(static, 1024) num_threads(nthreads)
    for (int64_t j = 0; j < n; ++j) {
        if (j + PF < n) {
            const float *na = a + (int64_t)r[j + PF] * B, *nb = b + (int64_t)c[j + PF] * B;
            for (int64_t t = 0; t < B; t += 16) { __builtin_prefetch(na + t); __builtin_prefetch(nb + t); }
        }
        const float *x = a + (int64_t)r[j] * B;
        const float *y = b + (int64_t)c[j] * B;
        v16 acc = {0};
        int64_t t = 0;
        for (; t + 16 <= B; t += 16) acc += LD(x + t) * LD(y + t);
        float s = 0.0f;
        for (; t < B; ++t) s += x[t] * y[t];
        for (int u = 0; u < 16; ++u) s += acc[u];
        out[j] = s;
    }
}

/* out[j] = position of key[j] = row * cols + col among the stored entries, or -1: a binary
   search inside the row's own (short, sorted) column segment, so queries need no sorting and
   the search stays within a cache line or two. */
void locate(int64_t n, const int64_t *key, int64_t cols, int64_t rows, const int64_t *ptr,
            const int32_t *col, int64_t *out, int nthreads) {
    #pragma omp parallel for schedule(static, 4096) num_threads(nthreads)
    for (int64_t j = 0; j < n; ++j) {
        const int64_t k = key[j];
        int64_t found = -1;
        if (k >= 0 && k < rows * cols) {
            const int64_t r = k / cols;
            const int32_t c = (int32_t)(k - r * cols);
            int64_t lo = ptr[r], hi = ptr[r + 1];
            while (lo < hi) {
                const int64_t mid = lo + ((hi - lo) >> 1);
                if (col[mid] < c) lo = mid + 1; else hi = mid;
            }
            if (lo < ptr[r + 1] && col[lo] == c) found = lo;
        }
        out[j] = found;
    }
}

/* Counting sort by column of entries stored in (row, col) order: perm[p] is the CSR position
   of the p-th entry in (col, row) order. next[] starts as the CSC column pointer. O(N + cols). */
void csc_perm(int64_t n, const int32_t *col, int64_t *next, int32_t *perm) {
    for (int64_t j = 0; j < n; ++j) perm[next[col[j]]++] = (int32_t)j;
}
"""

# Tried in order: the native build, then a portable one for compilers that reject -march=native.
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"])
_failure: str | None = None


class SparseKernels:
    """The compiled loops, called on contiguous float32 CPU tensors."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        p, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._spmm = lib.spmm_rows
        self._spmm.argtypes = [i64, i64, p, p, p, p, p, p, p, cint]
        self._spmm.restype = None
        self._sddmm = lib.sddmm
        self._sddmm.argtypes = [i64, i64, p, p, p, p, p, cint]
        self._sddmm.restype = None
        self._locate = lib.locate
        self._locate.argtypes = [i64, p, i64, i64, p, p, p, cint]
        self._locate.restype = None
        self._csc_perm = lib.csc_perm
        self._csc_perm.argtypes = [i64, p, p, p]
        self._csc_perm.restype = None

    def spmm_rows(self, ptr: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                  wperm: torch.Tensor | None, src: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """``out [len(ptr) - 1, B]`` with ``out[r] = bias[r] + sum_j w[wperm[j]] * src[idx[j]]``
        (``out``, if given, must be a contiguous float32 buffer of that size)."""
        n_rows, batch = ptr.numel() - 1, src.shape[1]
        if out is None:
            out = torch.empty(n_rows, batch, dtype=torch.float32)
        if n_rows and batch:
            self._spmm(n_rows, batch, ptr.data_ptr(), idx.data_ptr(), w.data_ptr(),
                       None if wperm is None else wperm.data_ptr(), src.data_ptr(),
                       None if bias is None else bias.data_ptr(), out.data_ptr(),
                       torch.get_num_threads())
        return out

    def sddmm(self, r: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``out[j] = a[r[j]] . b[c[j]]`` for int32 ``r``, ``c`` and [*, B] ``a``, ``b``."""
        out = torch.empty(r.numel(), dtype=torch.float32)
        if r.numel():
            self._sddmm(r.numel(), a.shape[1], r.data_ptr(), c.data_ptr(), a.data_ptr(),
                        b.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out


    def locate(self, keys: torch.Tensor, cols: int, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """int64 [len(keys)]: the storage position of each flat key ``row * cols + col`` in the
        CSR structure (``crow`` int64, ``col`` int32 sorted within rows), or -1 if absent."""
        keys = keys.contiguous()
        out = torch.empty(keys.numel(), dtype=torch.long)
        if keys.numel():
            self._locate(keys.numel(), keys.data_ptr(), cols, crow.numel() - 1, crow.data_ptr(),
                         col.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out

    def csc_perm(self, col: torch.Tensor, ccol: torch.Tensor) -> torch.Tensor:
        """int32 permutation taking (row, col)-ordered entries to (col, row) order."""
        perm = torch.empty(col.numel(), dtype=torch.int32)
        nxt = ccol[:-1].clone()   # kept alive across the call
        if col.numel():
            self._csc_perm(col.numel(), col.data_ptr(), nxt.data_ptr(), perm.data_ptr())
        return perm


def cache_dir() -> Path:
    """Where compiled kernels live (see :mod:`regrow.nn._cbuild`)."""
    return _cbuild.cache_dir()


@functools.lru_cache(maxsize=1)
def load() -> SparseKernels | None:
    """The compiled kernels, or None (once, with a warning) when they cannot be built.

    Never raises: no compiler, an unusable cache folder, a library that does not load all
    leave the reason in :func:`unavailable_reason` and torch.sparse in charge.
    """
    global _failure
    _failure = None
    try:
        return _cbuild.compile_and_load("sparse_linear", _SOURCE, _FLAG_SETS,
                                        lambda lib, path, flags: SparseKernels(lib, path))
    except _cbuild.KernelUnavailable as exc:
        _failure = exc.reason
        if not exc.quiet:
            _cbuild.warn_unavailable("SparseLinear kernels", exc.reason, "falling back to torch.sparse")
        return None


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None, else None (calls ``load()`` first)."""
    load()
    return _failure
