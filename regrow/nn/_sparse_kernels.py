"""Compiled CPU kernels for ``SparseLinear`` (values + indices, unstructured sparsity).

Four loops do all the work of an always-sparse layer, each O(B * nnz) with nothing of size
out x in:

* ``spmm_rows``: ``out[r, :] = bias[r] + sum_j w[j] * src[idx[j], :]`` over a CSR-like row
  pointer. With ``src = x^T`` ([in, B]) it is the forward pass; with the transposed (CSC)
  index and ``src = grad_y^T`` it is the input gradient. Activations are kept feature-major
  ([features, B]) so each non-zero is one contiguous B-wide multiply-add that the compiler
  holds in vector registers (the layout SparseProp also uses).
* ``sddmm``: ``out[j] = <a[r[j], :], b[c[j], :]>``: the weight gradient of the active entries
  (``a = grad_y^T``, ``b = x^T``) when the input gradient is not wanted (a first layer), and
  GSE's gradients of sampled candidate pairs.
* ``spmm_bwd_fused``: both gradients in one pass over the CSC order, gathering each
  ``grad_y`` row once for the input gradient and the weight gradient together.

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

/* Rows of src are gathered at random: prefetch the row PF non-zeros ahead (across row ends:
   the entries are contiguous, so the next row's first gathers are not left unprefetched),
   which turns the gathers from latency-bound into bandwidth-bound once src outgrows the
   caches. */
#define PF 8

/* Batch columns t.. in tiles of 128, 64 and 16 lanes (the widths instantiated below):
   CALL(NV) handles columns [t, t + 16 * NV); the caller finishes the scalar tail t..B. */
#define FOR_BATCH_TILES(t, B, CALL)                                                             \
    for (; t + 128 <= B; t += 128) CALL(8);                                                     \
    for (; t + 64 <= B; t += 64) CALL(4);                                                       \
    for (; t + 16 <= B; t += 16) CALL(1);

/* One row of spmm over NV * 16 consecutive batch columns, accumulators in registers. */
#define DEFINE_TILE(NV)                                                                         \
static inline void tile##NV(int64_t s, int64_t e, int64_t lim, const int32_t *idx, const float *w,           \
                            const int32_t *wperm, const float *src, int64_t B, float b0,        \
                            float *o) {                                                         \
    v16 acc[NV];                                                                                \
    for (int u = 0; u < NV; ++u) acc[u] = (v16){0} + b0;                                        \
    for (int64_t j = s; j < e; ++j) {                                                           \
        if (j + PF < lim) {                                                                     \
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
        #define ROW_TILE(NV) tile##NV(s, e, ptr[n_rows], idx, w, wperm, src + t, B, b0, o + t)
        FOR_BATCH_TILES(t, B, ROW_TILE)
        #undef ROW_TILE
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

/* The backward of a layer with both gradients wanted, in one pass over the CSC order: for
   input feature c and each entry p of its column (output row r = rowt[p]),
       grad_x[c, :] += w[perm[p]] * grad_y[r, :]       and      dw[perm[p]] = <grad_y[r, :], x[c, :]>.
   Each grad_y row is gathered once and used twice, where a transposed spmm plus an sddmm
   would gather a random row twice per entry; the random gathers are what cost once the
   activations outgrow the caches. x[c] and grad_x[c] stay in registers. */
#define DEFINE_BWD_TILE(NV)                                                                     \
static inline void bwd_tile##NV(int64_t s, int64_t e, int64_t lim, const int32_t *rowt, const int32_t *perm, \
                                const float *w, const float *gy, int64_t B, const float *xc,    \
                                float *gxc, float *dw, int first) {                             \
    v16 xa[NV], acc[NV];                                                                        \
    for (int u = 0; u < NV; ++u) { xa[u] = LD(xc + 16 * u); acc[u] = (v16){0}; }                \
    for (int64_t p = s; p < e; ++p) {                                                           \
        if (p + PF < lim) {                                                                     \
            const float *ng = gy + (int64_t)rowt[p + PF] * B;                                   \
            for (int u = 0; u < NV; ++u) __builtin_prefetch(ng + 16 * u);                       \
        }                                                                                       \
        const float *g = gy + (int64_t)rowt[p] * B;                                             \
        const int32_t q = perm[p];                                                              \
        const float wq = w[q];                                                                  \
        v16 d = {0};                                                                            \
        for (int u = 0; u < NV; ++u) {                                                          \
            const v16 gv = LD(g + 16 * u);                                                      \
            acc[u] += wq * gv;                                                                  \
            d += gv * xa[u];                                                                    \
        }                                                                                       \
        float sd = 0.0f;                                                                        \
        for (int u = 0; u < 16; ++u) sd += d[u];                                                \
        dw[q] = first ? sd : dw[q] + sd;                                                        \
    }                                                                                           \
    for (int u = 0; u < NV; ++u) ST(gxc + 16 * u, acc[u]);                                      \
}
DEFINE_BWD_TILE(8)
DEFINE_BWD_TILE(4)
DEFINE_BWD_TILE(1)

void spmm_bwd_fused(int64_t n_cols, int64_t B, const int64_t *ccol, const int32_t *rowt,
                    const int32_t *perm, const float *w, const float *gy, const float *x,
                    float *gx, float *dw, int nthreads) {
    #pragma omp parallel for schedule(dynamic, 32) num_threads(nthreads)
    for (int64_t c = 0; c < n_cols; ++c) {
        const int64_t s = ccol[c], e = ccol[c + 1];
        const float *xc = x + c * B;
        float *gxc = gx + c * B;
        int64_t t = 0;
        #define COL_TILE(NV) bwd_tile##NV(s, e, ccol[n_cols], rowt, perm, w, gy + t, B, xc + t, gxc + t, dw, t == 0)
        FOR_BATCH_TILES(t, B, COL_TILE)
        #undef COL_TILE
        if (t < B) {
            for (int64_t p = s; p < e; ++p) {
                const float *g = gy + (int64_t)rowt[p] * B;
                float sd = 0.0f;
                for (int64_t u = t; u < B; ++u) sd += g[u] * xc[u];
                dw[perm[p]] = t == 0 ? sd : dw[perm[p]] + sd;
            }
            for (int64_t u = t; u < B; ++u) {
                float acc = 0.0f;
                for (int64_t p = s; p < e; ++p) acc += w[perm[p]] * gy[(int64_t)rowt[p] * B + u];
                gxc[u] = acc;
            }
        }
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
        self._bwd = lib.spmm_bwd_fused
        self._bwd.argtypes = [i64, i64, p, p, p, p, p, p, p, p, cint]
        self._bwd.restype = None
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

    def backward_fused(self, ccol: torch.Tensor, row_t: torch.Tensor, perm: torch.Tensor,
                       w: torch.Tensor, g_t: torch.Tensor, x_t: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both gradients of ``y^T = W x^T`` in one pass over the CSC structure (``ccol``,
        ``row_t``, ``perm`` as built by ``_Topology.csc``): ``(grad_x^T [cols, B],
        grad_w [N] in CSR order)`` from ``g_t = grad_y^T [rows, B]`` and ``x_t = x^T``."""
        n_cols, batch = ccol.numel() - 1, g_t.shape[1]
        gx = torch.empty(n_cols, batch, dtype=torch.float32)
        dw = torch.empty(w.numel(), dtype=torch.float32)
        if n_cols and batch:   # writes every entry of both (each entry lies in one column)
            self._bwd(n_cols, batch, ccol.data_ptr(), row_t.data_ptr(), perm.data_ptr(), w.data_ptr(),
                      g_t.data_ptr(), x_t.data_ptr(), gx.data_ptr(), dw.data_ptr(), torch.get_num_threads())
        else:
            gx.zero_()
            dw.zero_()
        return gx, dw

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
