"""Compiled CPU kernel for condensed (constant fan-in) linear layers.

The kernel is plain C (OpenMP; AVX2 gathers for batch 1 where the compiler targets AVX2, GCC
vector extensions for the batched tiles; measured here, 8-wide AVX2 gathers matched or beat
16-wide AVX-512 ones), compiled once with the system ``gcc`` into a per-user cache and
called through ``ctypes``. Why not ``torch.utils.cpp_extension.load_inline``: on this 2-core
machine it took 25 s to compile a one-line function (it includes all of ``torch/extension.h``),
against 0.7 s for this file, and the kernel needs nothing from torch but raw pointers.

The shared library links ``libgomp.so.1``; torch ships a library of the same soname and loads it
first, so both use one OpenMP runtime (no second pool of spinning threads).

Building, caching and the environment variables (``REGROW_DISABLE_KERNEL``, ``REGROW_CACHE_DIR``,
``CC``) are shared with the SparseLinear kernels in :mod:`regrow.nn._cbuild`. If anything fails
(no compiler, a flag it rejects, an unusable cache folder, ``REGROW_DISABLE_KERNEL=1``),
``load()`` returns ``None``, with one warning naming the reason (none when disabled on
purpose), and callers use the pure-PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from . import _cbuild

# Batch tiles: the batched kernel transposes BT rows of x into a [in_features, BT] buffer that
# stays in L2 and streams W/idx once per tile. Both are multiples of 16 (one AVX-512 vector).
BATCH_TILES = (16, 32)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64), aligned(4)));

/* ---- batch 1: y[o] = bias[o] + sum_j W[o, j] * x[idx[o, j]] ------------------------------ */

#if defined(__AVX2__) && defined(__FMA__)
#define GATHER8_I16(id, x) _mm256_i32gather_ps((x), _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)(id))), 4)
#define GATHER8_I32(id, x) _mm256_i32gather_ps((x), _mm256_loadu_si256((const __m256i*)(id)), 4)
#define DOT_BODY(GATHER)                                                                    \
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                              \
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();                              \
    for (; j + 32 <= k; j += 32) {                                                          \
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), GATHER(id + j, x), a0);               \
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), GATHER(id + j + 8, x), a1);       \
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 16), GATHER(id + j + 16, x), a2);     \
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 24), GATHER(id + j + 24, x), a3);     \
    }                                                                                       \
    for (; j + 8 <= k; j += 8)                                                              \
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), GATHER(id + j, x), a0);               \
    {                                                                                       \
        float t[8];                                                                         \
        _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));   \
        acc += ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));           \
    }
#define DOT_I16 DOT_BODY(GATHER8_I16)
#define DOT_I32 DOT_BODY(GATHER8_I32)
#else
#define DOT_BODY                                                                            \
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;                                           \
    for (; j + 4 <= k; j += 4) {                                                            \
        a0 += w[j] * x[id[j]]; a1 += w[j + 1] * x[id[j + 1]];                               \
        a2 += w[j + 2] * x[id[j + 2]]; a3 += w[j + 3] * x[id[j + 3]];                       \
    }                                                                                       \
    acc += (a0 + a1) + (a2 + a3);
#define DOT_I16 DOT_BODY
#define DOT_I32 DOT_BODY
#endif

/* rows kernel: every row of x against every condensed row; W/idx read once, x rows from cache */
#define DEF_ROWS(NAME, IT, DOT)                                                             \
void NAME(const float* xs, const float* W, const IT* idx, const float* bias, float* y,      \
          int64_t B, int64_t n, int64_t R, int64_t k, int nthreads) {                       \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")    \
    for (int64_t o = 0; o < R; ++o) {                                                       \
        const float* w = W + o * k;                                                         \
        const IT* id = idx + o * k;                                                         \
        for (int64_t b = 0; b < B; ++b) {                                                   \
            const float* x = xs + b * n;                                                    \
            float acc = 0.f;                                                                \
            int64_t j = 0;                                                                  \
            DOT                                                                             \
            for (; j < k; ++j) acc += w[j] * x[id[j]];                                      \
            y[b * R + o] = acc + (bias ? bias[o] : 0.f);                                    \
        }                                                                                   \
    }                                                                                       \
}
DEF_ROWS(regrow_condensed_rows_i16, int16_t, DOT_I16)
DEF_ROWS(regrow_condensed_rows_i32, int32_t, DOT_I32)

/* ---- batched: tiles of BT rows of x, transposed into buf [n, BT] ---------------------------
   acc[0:BT] += W[o, j] * buf[idx[o, j], 0:BT]: contiguous vector loads, no gathers, and the
   condensed weights are streamed once per tile instead of once per sample. */
#define DEF_TILE(NAME, IT, BT)                                                              \
void NAME(const float* x, const float* W, const IT* idx, const float* bias, float* y,       \
          int64_t B, int64_t n, int64_t R, int64_t k, float* buf, int nthreads) {           \
    enum { NV = BT / 16, RG = 16 };                                                         \
    const int64_t groups = (R + RG - 1) / RG;                                               \
    _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")                         \
    for (int64_t b0 = 0; b0 < B; b0 += BT) {                                                \
        const int64_t bt = B - b0 < BT ? B - b0 : BT;                                       \
        _Pragma("omp for schedule(static)")                                                 \
        for (int64_t i0 = 0; i0 < n; i0 += 16) {                                            \
            const int64_t ie = i0 + 16 < n ? i0 + 16 : n;                                   \
            for (int64_t t = 0; t < BT; ++t) {                                              \
                if (t < bt) {                                                               \
                    const float* src = x + (b0 + t) * n;                                    \
                    for (int64_t i = i0; i < ie; ++i) buf[i * BT + t] = src[i];             \
                } else {                                                                    \
                    for (int64_t i = i0; i < ie; ++i) buf[i * BT + t] = 0.f;                \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        _Pragma("omp for schedule(static)")                                                 \
        for (int64_t g = 0; g < groups; ++g) {                                              \
            /* 16 rows at a time, so each output row y[b, o0:o0+16] is written as one     \
               cache line (column-wise writes at a stride of R floats alias in L1) */       \
            float blk[RG][BT];                                                              \
            const int64_t o0 = g * RG, oe = o0 + RG < R ? o0 + RG : R;                      \
            for (int64_t o = o0; o < oe; ++o) {                                             \
                const float* w = W + o * k;                                                 \
                const IT* id = idx + o * k;                                                 \
                v16f a[NV], c[NV];                                                          \
                for (int v = 0; v < NV; ++v) { a[v] = (v16f){0}; c[v] = (v16f){0}; }        \
                int64_t j = 0;                                                              \
                for (; j + 2 <= k; j += 2) {                                                \
                    const v16f* s0 = (const v16f*)(buf + (int64_t)id[j] * BT);              \
                    const v16f* s1 = (const v16f*)(buf + (int64_t)id[j + 1] * BT);          \
                    const float w0 = w[j], w1 = w[j + 1];                                   \
                    for (int v = 0; v < NV; ++v) { a[v] += w0 * s0[v]; c[v] += w1 * s1[v]; }\
                }                                                                           \
                for (; j < k; ++j) {                                                        \
                    const v16f* s0 = (const v16f*)(buf + (int64_t)id[j] * BT);              \
                    const float w0 = w[j];                                                  \
                    for (int v = 0; v < NV; ++v) a[v] += w0 * s0[v];                        \
                }                                                                           \
                for (int v = 0; v < NV; ++v) {                                              \
                    v16f s = a[v] + c[v];                                                   \
                    memcpy(&blk[o - o0][16 * v], &s, 64);                                   \
                }                                                                           \
            }                                                                               \
            for (int64_t t = 0; t < bt; ++t) {                                              \
                float* yo = y + (b0 + t) * R;                                               \
                for (int64_t o = o0; o < oe; ++o)                                           \
                    yo[o] = blk[o - o0][t] + (bias ? bias[o] : 0.f);                        \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
}
DEF_TILE(regrow_condensed_tile16_i16, int16_t, 16)
DEF_TILE(regrow_condensed_tile16_i32, int32_t, 16)
DEF_TILE(regrow_condensed_tile32_i16, int16_t, 32)
DEF_TILE(regrow_condensed_tile32_i32, int32_t, 32)

int regrow_condensed_abi_version(void) { return 1; }
"""

_ABI_VERSION = 1
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)


class CondensedKernel:
    """ctypes handle to the compiled library; one instance per process (see ``load``)."""

    def __init__(self, lib: ctypes.CDLL, path: Path, flags: list[str]) -> None:
        self.path = path
        self.flags = flags
        p, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._rows = {}
        self._tile = {}
        for is16, it in ((True, "i16"), (False, "i32")):  # keyed by "indices are int16"
            fn = getattr(lib, f"regrow_condensed_rows_{it}")
            fn.argtypes = [p, p, p, p, p, i64, i64, i64, i64, cint]
            fn.restype = None
            self._rows[is16] = fn
            for bt in BATCH_TILES:
                fn = getattr(lib, f"regrow_condensed_tile{bt}_{it}")
                fn.argtypes = [p, p, p, p, p, i64, i64, i64, i64, p, cint]
                fn.restype = None
                self._tile[(bt, is16)] = fn

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor, nthreads: int) -> None:
        """``out[b, o] = bias[o] + sum_j weight[o, j] * x[b, idx[o, j]]``, the fastest way measured.

        All tensors float32 (idx int16/int32), contiguous, on the CPU; not checked here.
        Per-sample gathers win up to batch 2; beyond, batch tiles stream the weights once per
        16 (batch <= 16) or 32 samples.
        """
        b = x.shape[0]
        if b <= 2:
            self.rows(x, weight, idx, bias, out, nthreads)
        else:
            self.tiled(x, weight, idx, bias, out, nthreads, 16 if b <= 16 else 32)

    def rows(self, x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None,
             out: torch.Tensor, nthreads: int) -> None:
        """The per-sample gather-dot kernel (any batch)."""
        b, n = x.shape
        r, k = weight.shape
        self._rows[idx.dtype == torch.int16](x.data_ptr(), weight.data_ptr(), idx.data_ptr(),
                                             bias.data_ptr() if bias is not None else None, out.data_ptr(),
                                             b, n, r, k, nthreads)

    def tiled(self, x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None,
              out: torch.Tensor, nthreads: int, tile: int) -> None:
        """The batch-tiled kernel, ``tile`` in ``BATCH_TILES``."""
        b, n = x.shape
        r, k = weight.shape
        buf = torch.empty(n * tile, dtype=torch.float32)
        self._tile[(tile, idx.dtype == torch.int16)](x.data_ptr(), weight.data_ptr(), idx.data_ptr(),
                                                     bias.data_ptr() if bias is not None else None,
                                                     out.data_ptr(), b, n, r, k, buf.data_ptr(), nthreads)


def cache_dir() -> Path:
    """Where compiled kernels live (see :mod:`regrow.nn._cbuild`)."""
    return _cbuild.cache_dir()


def _check_abi(lib: ctypes.CDLL, path: Path, flags: list[str]) -> CondensedKernel:
    if lib.regrow_condensed_abi_version() != _ABI_VERSION:
        raise OSError(f"{path}: ABI version mismatch")
    return CondensedKernel(lib, path, flags)


_failure: str | None = None


@functools.lru_cache(maxsize=1)
def load() -> CondensedKernel | None:
    """The compiled kernel, building it on first use; ``None`` (with one warning) if unavailable.

    Never raises: no compiler, an unusable cache folder, a library that does not load all
    leave the reason in :func:`unavailable_reason` and the PyTorch path in charge.
    """
    global _failure
    kernel, _failure = _cbuild.load_or_none("condensed", _SOURCE, _FLAG_SETS, _check_abi,
                                            "condensed kernel", "using the PyTorch path")
    return kernel


def unavailable_reason() -> str | None:
    """Why ``load()`` returned None (after it was called), else None."""
    load()
    return _failure
