"""Compiled CPU kernels for ``SparseLinear`` (values + indices, unstructured sparsity).

Three loops do the work of an always-sparse layer, each O(B * nnz) with nothing of size
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

Wide layers gather by panels: once the gathered activations outgrow the caches (width 16k
and up at batch 128), every random row gather is a DRAM read. ``spmm_rows`` and
``spmm_bwd_fused`` then take their entries in panel-major order (``bucket_order``, a counting
sort): one panel of gathered rows at a time, small enough to stay in the last-level cache,
with each output row's partial sum streamed through memory between panels. The sums are the
same to the bit. At width 256k on one thread that took the forward from 113-124 to 64-81
ns per weight here and, with ``gather32`` / ``scatter32`` moving the backward's values and
weight gradients into and out of the panel order in loops of their own, the backward from
168-186 to 103-119 ns.

Two helpers for topology updates avoid sorting, which costs about 0.2 us per int64 element
here (0.46 s for 2M keys on one thread): ``locate`` (position of flat keys, a binary search in the
row's own column segment) and ``bucket_order`` (a counting sort of the entries: by column for
the CSC order, by panel and row or column for the panel-major orders).

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

from ..core import hugepages
from . import _cbuild

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
#define LD(p) (*(const v16 *)(p))
#define ST(p, v) (*(v16 *)(p) = (v))

/* Rows of src are gathered at random: prefetch the row PF non-zeros ahead (across row ends:
   the entries are contiguous, so the next row's first gathers are not left unprefetched),
   which turns the gathers from latency-bound into bandwidth-bound once src outgrows the
   caches. */
#define PF 8
#define PFW 32

/* Batch columns t.. in tiles of 128, 64 and 16 lanes (the widths instantiated below):
   CALL(NV) handles columns [t, t + 16 * NV); the caller finishes the scalar tail t..B. */
#define FOR_BATCH_TILES(t, B, CALL)                                                             \
    for (; t + 128 <= B; t += 128) CALL(8);                                                     \
    for (; t + 64 <= B; t += 64) CALL(4);                                                       \
    for (; t + 16 <= B; t += 16) CALL(1);

/* One row of spmm over NV * 16 consecutive batch columns, accumulators in registers; with
   `acc_out` the row continues the sum already in o (a later panel, see spmm_rows). */
#define DEFINE_TILE(NV)                                                                         \
static inline void tile##NV(int64_t s, int64_t e, int64_t lim, const int32_t *idx, const float *w,           \
                            const int32_t *wperm, const float *src, int64_t B, float b0,        \
                            float *o, int acc_out) {                                            \
    v16 acc[NV];                                                                                \
    for (int u = 0; u < NV; ++u) acc[u] = acc_out ? LD(o + 16 * u) : (v16){0} + b0;             \
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

/* Panels: once src outgrows the caches every gather is a DRAM read of a whole B-wide row.
   The caller may split the gathered index range into n_panels consecutive panels (small
   enough to stay in the last-level cache) with the entries stored panel-major: ptr then
   has n_panels * n_rows + 1 entries, panel k's part of row r being ptr[k * n_rows + r] ..
   ptr[k * n_rows + r + 1]. Panel 0 writes every row; a later panel adds to the rows it has
   entries in. Within a row the entries keep their order, so the sum is the same to the bit
   as with one panel; only the row's partial sum travels through memory between panels,
   a streaming read and write instead of random DRAM gathers. */
void spmm_rows(int64_t n_rows, int64_t n_panels, int64_t B, const int64_t *ptr, const int32_t *idx,
               const float *w, const int32_t *wperm, const float *src, const float *bias,
               float *out, int nthreads) {
    const int64_t lim = ptr[n_panels * n_rows];
    #pragma omp parallel num_threads(nthreads)
    for (int64_t k = 0; k < n_panels; ++k) {
        #pragma omp for schedule(dynamic, 32)
        for (int64_t r = 0; r < n_rows; ++r) {
            const int64_t s = ptr[k * n_rows + r], e = ptr[k * n_rows + r + 1];
            const int acc_out = k > 0;
            if (acc_out && s == e) continue;
            const float b0 = bias ? bias[r] : 0.0f;
            float *o = out + r * B;
            int64_t t = 0;
            #define ROW_TILE(NV) tile##NV(s, e, lim, idx, w, wperm, src + t, B, b0, o + t, acc_out)
            FOR_BATCH_TILES(t, B, ROW_TILE)
            #undef ROW_TILE
            for (; t < B; ++t) {
                float acc = acc_out ? o[t] : b0;
                for (int64_t j = s; j < e; ++j)   /* explicit fma: the same rounding however the loop is compiled */
                    acc = __builtin_fmaf(wperm ? w[wperm[j]] : w[j], src[(int64_t)idx[j] * B + t], acc);
                o[t] = acc;
            }
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
                                float *gxc, float *dw, int first, int acc_out) {                \
    v16 xa[NV], acc[NV];                                                                        \
    for (int u = 0; u < NV; ++u) {                                                              \
        xa[u] = LD(xc + 16 * u);                                                                \
        acc[u] = acc_out ? LD(gxc + 16 * u) : (v16){0};                                         \
    }                                                                                           \
    for (int64_t p = s; p < e; ++p) {                                                           \
        if (p + PF < lim) {                                                                     \
            const float *ng = gy + (int64_t)rowt[p + PF] * B;                                   \
            for (int u = 0; u < NV; ++u) __builtin_prefetch(ng + 16 * u);                       \
        }                                                                                       \
        if (perm && p + PFW < lim) {                                                            \
            __builtin_prefetch(w + perm[p + PFW]);                                              \
            __builtin_prefetch(dw + perm[p + PFW], 1);                                          \
        }                                                                                       \
        const float *g = gy + (int64_t)rowt[p] * B;                                             \
        const int64_t q = perm ? perm[p] : p;                                                   \
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

/* Panels over the gathered grad_y rows as in spmm_rows (ccol has n_panels * n_cols + 1
   entries); each entry lies in one panel, so dw is written once per batch tile. */
void spmm_bwd_fused(int64_t n_cols, int64_t n_panels, int64_t B, const int64_t *ccol, const int32_t *rowt,
                    const int32_t *perm, const float *w, const float *gy, const float *x,
                    float *gx, float *dw, int nthreads) {
    const int64_t lim = ccol[n_panels * n_cols];
    #pragma omp parallel num_threads(nthreads)
    for (int64_t k = 0; k < n_panels; ++k) {
        #pragma omp for schedule(dynamic, 32)
        for (int64_t c = 0; c < n_cols; ++c) {
            const int64_t s = ccol[k * n_cols + c], e = ccol[k * n_cols + c + 1];
            const int acc_out = k > 0;
            float *gxc = gx + c * B;
            if (s == e) {   /* nothing to add, and x[c] need not be read (most columns of a narrow next layer) */
                if (!acc_out) memset(gxc, 0, B * sizeof(float));
                continue;
            }
            const float *xc = x + c * B;
            int64_t t = 0;
            #define COL_TILE(NV) bwd_tile##NV(s, e, lim, rowt, perm, w, gy + t, B, xc + t, gxc + t, dw, t == 0, acc_out)
            FOR_BATCH_TILES(t, B, COL_TILE)
            #undef COL_TILE
            if (t < B) {
                for (int64_t p = s; p < e; ++p) {
                    const float *g = gy + (int64_t)rowt[p] * B;
                    const int64_t q = perm ? perm[p] : p;
                    float sd = 0.0f;
                    for (int64_t u = t; u < B; ++u) sd += g[u] * xc[u];
                    dw[q] = t == 0 ? sd : dw[q] + sd;
                }
                for (int64_t u = t; u < B; ++u) {
                    float acc = acc_out ? gxc[u] : 0.0f;
                    for (int64_t p = s; p < e; ++p)
                        acc = __builtin_fmaf(w[perm ? perm[p] : p], gy[(int64_t)rowt[p] * B + u], acc);
                    gxc[u] = acc;
                }
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

/* A stable counting sort of the entries, stored in (row, col) order, by the bucket
   (a[j] / P) * nb + b[j]: with a = row, b = col and P = rows it is the CSC order; with a = col,
   b = row, the panel-major CSR order of spmm_rows (panels of P input features); with
   a = row, b = col, the panel-major CSC order of spmm_bwd_fused. Writes ptr
   [n_buckets + 1] and order [N] (the (row, col) position of each entry in bucket order).
   O(N + n_buckets); returns -1 if its scratch cannot be allocated. */
int bucket_order(int64_t n, const int32_t *a, const int32_t *b, int64_t P, int64_t nb,
                 int64_t n_buckets, int64_t *ptr, int32_t *order) {
    int64_t *next = malloc(n_buckets * sizeof(int64_t) + 1);   /* + 1: malloc(0) may give NULL */
    if (!next) return -1;
    /* indices are non-negative int32, P fits in 32 bits: a 32-bit division */
    #define BUCKET(j) ((int64_t)((uint32_t)a[j] / (uint32_t)P) * nb + b[j])
    for (int64_t i = 0; i <= n_buckets; ++i) ptr[i] = 0;
    for (int64_t j = 0; j < n; ++j) ++ptr[BUCKET(j) + 1];
    for (int64_t i = 0; i < n_buckets; ++i) ptr[i + 1] += ptr[i];
    memcpy(next, ptr, n_buckets * sizeof(int64_t));
    for (int64_t j = 0; j < n; ++j) order[next[BUCKET(j)]++] = (int32_t)j;
    #undef BUCKET
    free(next);
    return 0;
}

/* dst[j] = src[perm[j]] and dst[perm[j]] = src[j] for 4-byte elements (float32 or int32),
   prefetching ahead: random single-element reads and writes in a loop of their own keep
   many cache misses in flight (torch's indexing ran at 23-47 ns per element here). */
void gather32(int64_t n, const int32_t *perm, const uint32_t *src, uint32_t *dst) {
    for (int64_t j = 0; j < n; ++j) {
        if (j + 32 < n) __builtin_prefetch(src + perm[j + 32]);
        dst[j] = src[perm[j]];
    }
}
void scatter32(int64_t n, const int32_t *perm, const uint32_t *src, uint32_t *dst) {
    for (int64_t j = 0; j < n; ++j) {
        if (j + 32 < n) __builtin_prefetch(dst + perm[j + 32], 1);
        dst[perm[j]] = src[j];
    }
}

"""

_FLAG_SETS = _cbuild.OPENMP_FLAG_SETS
_failure: str | None = None


class SparseKernels:
    """The compiled loops, called on contiguous float32 CPU tensors."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        p, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._spmm = lib.spmm_rows
        self._spmm.argtypes = [i64, i64, i64, p, p, p, p, p, p, p, cint]
        self._spmm.restype = None
        self._sddmm = lib.sddmm
        self._sddmm.argtypes = [i64, i64, p, p, p, p, p, cint]
        self._sddmm.restype = None
        self._bwd = lib.spmm_bwd_fused
        self._bwd.argtypes = [i64, i64, i64, p, p, p, p, p, p, p, p, cint]
        self._bwd.restype = None
        self._locate = lib.locate
        self._locate.argtypes = [i64, p, i64, i64, p, p, p, cint]
        self._locate.restype = None
        self._bucket_order = lib.bucket_order
        self._bucket_order.argtypes = [i64, p, p, i64, i64, i64, p, p]
        self._bucket_order.restype = cint
        self._gather = lib.gather32
        self._gather.argtypes = [i64, p, p, p]
        self._scatter = lib.scatter32
        self._scatter.argtypes = [i64, p, p, p]

    def spmm_rows(self, ptr: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                  wperm: torch.Tensor | None, src: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor | None = None, n_panels: int = 1) -> torch.Tensor:
        """``out [n_rows, B]`` with ``out[r] = bias[r] + sum_j w[wperm[j]] * src[idx[j]]``
        (``out``, if given, must be a contiguous float32 buffer of that size). ``ptr`` has
        ``n_panels * n_rows + 1`` entries (panel-major entries, see :meth:`bucket_order`)."""
        n_rows, batch = (ptr.numel() - 1) // n_panels, src.shape[1]
        if out is None:
            out = hugepages.empty(n_rows, batch)
        if n_rows and batch:
            self._spmm(n_rows, n_panels, batch, ptr.data_ptr(), idx.data_ptr(), w.data_ptr(),
                       None if wperm is None else wperm.data_ptr(), src.data_ptr(),
                       None if bias is None else bias.data_ptr(), out.data_ptr(),
                       torch.get_num_threads())
        return out

    def sddmm(self, r: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``out[j] = a[r[j]] . b[c[j]]`` for int32 ``r``, ``c`` and [*, B] ``a``, ``b``."""
        out = hugepages.empty(r.numel())
        if r.numel():
            self._sddmm(r.numel(), a.shape[1], r.data_ptr(), c.data_ptr(), a.data_ptr(),
                        b.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out

    def backward_fused(self, ccol: torch.Tensor, row_t: torch.Tensor, perm: torch.Tensor,
                       w: torch.Tensor, g_t: torch.Tensor, x_t: torch.Tensor, n_panels: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both gradients of ``y^T = W x^T`` in one pass over the CSC structure (``ccol``,
        ``row_t``, ``perm`` as built by ``_Topology.csc``, or their panel-major order):
        ``(grad_x^T [cols, B], grad_w [N] in CSR order)`` from ``g_t = grad_y^T [rows, B]``
        and ``x_t = x^T``."""
        n_cols, batch = (ccol.numel() - 1) // n_panels, g_t.shape[1]
        gx = hugepages.empty(n_cols, batch)
        dw = hugepages.empty(w.numel())
        if not (n_cols and batch):
            return gx.zero_(), dw.zero_()
        # panelled (wide) layers: w and dw in the structure's own order, so the random reads
        # and writes of single floats run in tight loops of their own (about 15% faster at 256k)
        separate = n_panels > 1 and perm is not None
        w_in = self.permute(w, perm) if separate else w
        self._bwd(n_cols, n_panels, batch, ccol.data_ptr(), row_t.data_ptr(),
                  None if separate or perm is None else perm.data_ptr(), w_in.data_ptr(),
                  g_t.data_ptr(), x_t.data_ptr(), gx.data_ptr(), dw.data_ptr(), torch.get_num_threads())
        return gx, self.permute(dw, perm, inverse=True) if separate else dw

    def locate(self, keys: torch.Tensor, cols: int, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """int64 [len(keys)]: the storage position of each flat key ``row * cols + col`` in the
        CSR structure (``crow`` int64, ``col`` int32 sorted within rows), or -1 if absent."""
        keys = keys.contiguous()
        out = hugepages.empty(keys.numel(), dtype=torch.long)
        if keys.numel():
            self._locate(keys.numel(), keys.data_ptr(), cols, crow.numel() - 1, crow.data_ptr(),
                         col.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out

    def bucket_order(self, a: torch.Tensor, b: torch.Tensor, panel: int, nb: int, n_panels: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stable counting sort of (row, col)-ordered entries by ``(a // panel) * nb + b``
        (int32 ``a``, ``b``; ``a < n_panels * panel``, ``b < nb``): ``(ptr int64
        [n_panels * nb + 1], order int32 [N])``, ``order`` giving each sorted entry's position."""
        n_buckets = n_panels * nb
        ptr = torch.empty(n_buckets + 1, dtype=torch.int64)
        order = hugepages.empty(a.numel(), dtype=torch.int32)
        if self._bucket_order(a.numel(), a.data_ptr(), b.data_ptr(), panel, nb, n_buckets,
                              ptr.data_ptr(), order.data_ptr()) != 0:
            raise MemoryError(f"bucket_order: no memory for {n_buckets} bucket counters")
        return ptr, order

    def permute(self, src: torch.Tensor, perm: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``src[perm]`` or, with ``inverse``, ``out`` with ``out[perm] = src``, for a contiguous
        1-D ``src`` of 4-byte elements (float32, int32) and an int32 ``perm``."""
        if src.element_size() != 4 or perm.dtype != torch.int32 or src.numel() != perm.numel():
            raise ValueError("permute needs a 4-byte src and an int32 perm of the same length")
        src = src.contiguous()
        out = hugepages.empty_like(src)
        (self._scatter if inverse else self._gather)(src.numel(), perm.data_ptr(), src.data_ptr(), out.data_ptr())
        return out


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
    kernels, _failure = _cbuild.load_or_none("sparse_linear", _SOURCE, _FLAG_SETS,
                                             lambda lib, path, flags: SparseKernels(lib, path),
                                             "SparseLinear kernels", "falling back to torch.sparse")
    return kernels


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None, else None (calls ``load()`` first)."""
    load()
    return _failure
