"""Compiled CPU kernels for ``SparseConv2d``: direct sparse convolution over the active taps.

Formulation (SparseProp's direct convolution; see docs/performance.md for the measurement
against the alternatives): for output channel ``o`` and each of its active taps ``(c, i, j)``
with weight ``w``,

    y[o, oh, ow, :] += w * x[c, oh * sh + i * dh, ow * sw + j * dw, :]

on a zero-padded input, and, transposed, ``grad_x[c, ...] += w * grad_y[o, oh, ow, :]`` and
``grad_w = sum over positions of <grad_y[o, oh, ow, :], x[c, shifted, :]>``. Work is
O(N * B * Ho * Wo) for N active taps; nothing of the dense kernel's size is ever made, nor
any im2col matrix.

Layout: batch innermost inside the kernels, ``x`` as ``[C, Hp, Wp, B]`` and ``grad_y`` as ``[O,
Ho, Wo, B]``. Then every tap at every output position is one contiguous multiply-add over the
samples, whatever the stride and dilation (the layout SparseLinear's kernels use, [features,
B]). Width innermost would vectorise over ``Wo`` only: 8 lanes at a ResNet's 8x8 stage, and
strided loads at stride 2. The batch is cut into chunks of 16 lanes (one 64-byte cache line, two
AVX2 registers): one chunk of one output row for all output channels reads about ``C * kh * Wp *
64`` bytes of input (420-490 KB for the ResNet stages at 32x32, 16x16 and 8x8), which stays in a
core's L2 while every output channel's taps read it. Outputs and input gradients leave as
contiguous NCHW (what BatchNorm, the usual neighbour, reads fastest).

* ``conv_forward``: per (batch chunk, output row), every output channel; register tiles of 8
  output positions x 8 samples accumulate over the channel's taps (CSR order), bias included,
  and are transposed in registers so that each sample's 8 positions are one store into NCHW
  ``y`` (row ends: tiles of 4 and 1 positions x 16 samples).
* ``conv_backward``: per (batch chunk, output row), the input channels split among threads
  (no two threads write the same ``grad_x`` or weight-gradient entry). Each channel's taps are
  grouped by kernel offset (``c``, ``i``, ``j``), then output channel: for a tile of 2 output
  positions the input pixels the offset reads are loaded once and held in registers, each tap
  loads its ``grad_y`` tile once and uses it twice, for the input gradient (accumulated in
  registers, added to ``grad_x`` once per offset) and for its weight gradient (8 partial sums
  per tap, summed once per row) -- the fused backward of SparseLinear's ``spmm_bwd_fused``.
* ``to_batch_inner`` / ``from_batch_inner``: NCHW (any strides) to the padded batch-innermost
  copy and back, 8 x 8 blocks at a time through the same register transpose.

Threads: ``torch.get_num_threads()`` (OpenMP). Batch sizes that are not a multiple of 16 and
output rows that are not a multiple of the tile finish in scalar loops (explicit fma, the same
result however they are compiled). The source is built and cached by
:mod:`regrow.nn._cbuild` like SparseLinear's kernels; without a compiler, with
``REGROW_DISABLE_KERNEL=1``, or for other dtypes and devices, ``SparseConv2d`` uses its
pure-torch route (offset-grouped torch.sparse products), which gives the same results.
"""
from __future__ import annotations

import ctypes
import functools
import weakref
from pathlib import Path

import torch

from ..core import hugepages
from . import _cbuild

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef float v8 __attribute__((vector_size(32), aligned(4)));
#define LD(p) (*(const v8 *)(p))
#define ST(p, v) (*(v8 *)(p) = (v))
#define BC 16   /* batch lanes per chunk: two v8 */

/* geometry g[]: C, Hp, Wp (padded input), O, Ho, Wo, B, kh, kw, sh, sw, dh, dw */
enum { G_C, G_HP, G_WP, G_O, G_HO, G_WO, G_B, G_KH, G_KW, G_SH, G_SW, G_DH, G_DW };

static inline float hsum(v8 v) {
    float s = 0.0f;
    for (int u = 0; u < 8; ++u) s += v[u];
    return s;
}

/* 8x8 transpose in registers: r[i][j] -> r[j][i]. */
static inline void transpose8(v8 r[8]) {
    typedef int32_t v8i __attribute__((vector_size(32)));
    v8 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {   /* pairs of rows, interleaved within 128-bit lanes */
        t[i] = __builtin_shuffle(r[i], r[i + 1], (v8i){0, 8, 1, 9, 4, 12, 5, 13});
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], (v8i){2, 10, 3, 11, 6, 14, 7, 15});
    }
    for (int i = 0; i < 8; i += 4)     /* quads of rows */
        for (int h = 0; h < 2; ++h) {
            u[i + 2 * h] = __builtin_shuffle(t[i + h], t[i + h + 2], (v8i){0, 1, 8, 9, 4, 5, 12, 13});
            u[i + 2 * h + 1] = __builtin_shuffle(t[i + h], t[i + h + 2], (v8i){2, 3, 10, 11, 6, 7, 14, 15});
        }
    /* u[k], u[k + 4] (k < 4): columns k and k + 4 of rows 0-3 and of rows 4-7, by 128-bit lane */
    for (int k = 0; k < 4; ++k) {
        r[k] = __builtin_shuffle(u[k], u[k + 4], (v8i){0, 1, 2, 3, 8, 9, 10, 11});
        r[k + 4] = __builtin_shuffle(u[k], u[k + 4], (v8i){4, 5, 6, 7, 12, 13, 14, 15});
    }
}

/* Forward tiles write y in NCHW (what BatchNorm, the usual next op, reads fastest; no separate
   layout pass). tp[t] is tap t's input pixel offset from the tile's first input pixel (times B:
   floats), step the distance in floats between the input pixels of consecutive output
   positions (sw * B), ys the distance between samples in y (O * Ho * Wo).
   fwd_tile8: 8 positions x 8 samples, transposed in registers so that each sample's 8
   positions are one contiguous store. */
static inline void fwd_tile8(int64_t s, int64_t e, const int32_t *tp, const float *w, const float *x,
                             int64_t step, int64_t B, float b, float *y, int64_t ys) {
    v8 acc[8];
    for (int p = 0; p < 8; ++p) acc[p] = (v8){0} + b;
    for (int64_t t = s; t < e; ++t) {
        const float wt = w[t];
        const float *xp = x + (int64_t)tp[t] * B;
        for (int p = 0; p < 8; ++p) acc[p] += wt * LD(xp + p * step);
    }
    transpose8(acc);
    for (int i = 0; i < 8; ++i) ST(y + i * ys, acc[i]);
}

/* Row ends: P positions x 16 samples, stored element by element. */
#define DEFINE_FWD_TILE(P)                                                                      \
static inline void fwd_tile##P(int64_t s, int64_t e, const int32_t *tp, const float *w,         \
                               const float *x, int64_t step, int64_t B, float b, float *y,      \
                               int64_t ys) {                                                    \
    v8 acc[P][2];                                                                               \
    for (int p = 0; p < P; ++p) acc[p][0] = acc[p][1] = (v8){0} + b;                            \
    for (int64_t t = s; t < e; ++t) {                                                           \
        const float wt = w[t];                                                                  \
        const float *xp = x + (int64_t)tp[t] * B;                                               \
        for (int p = 0; p < P; ++p) {                                                           \
            acc[p][0] += wt * LD(xp + p * step);                                                \
            acc[p][1] += wt * LD(xp + p * step + 8);                                            \
        }                                                                                       \
    }                                                                                           \
    for (int p = 0; p < P; ++p)                                                                 \
        for (int u = 0; u < 8; ++u) {                                                           \
            y[u * ys + p] = acc[p][0][u];                                                       \
            y[(u + 8) * ys + p] = acc[p][1][u];                                                 \
        }                                                                                       \
}
DEFINE_FWD_TILE(4)
DEFINE_FWD_TILE(1)

/* Each tap's input pixel offset (c * Hp + i * dh) * Wp + j * dw, from its flat column
   c * kh * kw + i * kw + j (int32: the indices and weights streamed per output row stay small;
   the caller checks C * Hp * Wp < 2^31). NULL when out of memory. */
static int32_t *tap_offsets(int64_t n, const int32_t *col, const int64_t *g) {
    int32_t *tp = malloc((n + 1) * sizeof(int32_t));
    if (!tp) return NULL;
    const int64_t kk = g[G_KH] * g[G_KW];
    for (int64_t t = 0; t < n; ++t) {
        const int64_t c = col[t] / kk, k = col[t] % kk, i = k / g[G_KW], j = k % g[G_KW];
        tp[t] = (int32_t)((c * g[G_HP] + i * g[G_DH]) * g[G_WP] + j * g[G_DW]);
    }
    return tp;
}

int conv_forward(const int64_t *g, const int64_t *crow, const int32_t *col, const float *w,
                 const float *x, const float *bias, float *y, int nthreads) {
    const int64_t Wp = g[G_WP], O = g[G_O], Ho = g[G_HO], Wo = g[G_WO], B = g[G_B];
    const int64_t sh = g[G_SH], sw = g[G_SW], ys = O * Ho * Wo;
    int32_t *tp = tap_offsets(crow[O], col, g);
    if (!tp) return -1;
    const int64_t n_chunks = (B + BC - 1) / BC;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t bc = 0; bc < n_chunks; ++bc)
        for (int64_t oh = 0; oh < Ho; ++oh) {
            const int64_t b0 = bc * BC, nb = B - b0 < BC ? B - b0 : BC;
            const float *xrow = x + oh * sh * Wp * B + b0;   /* pixel (oh * sh, 0) of channel 0 */
            for (int64_t o = 0; o < O; ++o) {
                const int64_t s = crow[o], e = crow[o + 1];
                const float b = bias ? bias[o] : 0.0f;
                float *yrow = y + b0 * ys + (o * Ho + oh) * Wo;   /* y[b0, o, oh, 0] */
                int64_t ow = 0;
                if (nb == BC) {
                    for (; ow + 8 <= Wo; ow += 8) {
                        const float *xt = xrow + ow * sw * B;
                        fwd_tile8(s, e, tp, w, xt, sw * B, B, b, yrow + ow, ys);
                        fwd_tile8(s, e, tp, w, xt + 8, sw * B, B, b, yrow + 8 * ys + ow, ys);
                    }
                    for (; ow + 4 <= Wo; ow += 4) fwd_tile4(s, e, tp, w, xrow + ow * sw * B, sw * B, B, b, yrow + ow, ys);
                    for (; ow < Wo; ++ow) fwd_tile1(s, e, tp, w, xrow + ow * sw * B, sw * B, B, b, yrow + ow, ys);
                }
                for (; ow < Wo; ++ow)
                    for (int64_t u = 0; u < nb; ++u) {
                        float acc = b;
                        for (int64_t t = s; t < e; ++t)
                            acc = __builtin_fmaf(w[t], xrow[ow * sw * B + (int64_t)tp[t] * B + u], acc);
                        yrow[u * ys + ow] = acc;
                    }
            }
        }
    free(tp);
    return 0;
}

/* Backward tile: P output positions x 16 lanes at one kernel offset of one input channel, over
   that offset's taps s..e (output channel brow[t], value position bperm[t]). x and gx point at
   the input pixel of the tile's first position (step: sw * B between positions); gy at the
   tile's first output position of output channel 0 (plane: Ho * Wo * B between channels).
   dacc[t - s]: tap t's weight gradient as 8 partial sums, summed across the row's tiles (one
   horizontal sum per tap and row instead of one per tile).
   GX / DW: which gradients are wanted (compile-time, so the loop carries nothing unused). */
#define DEFINE_BWD_TILE(NAME, P, GX, DW)                                                        \
static inline void NAME(int64_t s, int64_t e, const int32_t *brow, const int32_t *bperm,       \
                        const float *w, const float *gy, int64_t plane, const float *x,         \
                        float *gx, int64_t step, int64_t B, v8 *dacc) {                         \
    v8 xa[P][2], acc[P][2];                                                                     \
    for (int p = 0; p < P; ++p) {                                                               \
        if (DW) { xa[p][0] = LD(x + p * step); xa[p][1] = LD(x + p * step + 8); }               \
        acc[p][0] = acc[p][1] = (v8){0};                                                        \
    }                                                                                           \
    for (int64_t t = s; t < e; ++t) {                                                           \
        const float *g = gy + brow[t] * plane;                                                  \
        const int32_t q = bperm[t];                                                             \
        const float wq = w[q];                                                                  \
        v8 d = {0};                                                                             \
        for (int p = 0; p < P; ++p) {                                                           \
            const v8 g0 = LD(g + p * B), g1 = LD(g + p * B + 8);                                \
            if (GX) { acc[p][0] += wq * g0; acc[p][1] += wq * g1; }                             \
            if (DW) { d += g0 * xa[p][0]; d += g1 * xa[p][1]; }                                 \
        }                                                                                       \
        if (DW) dacc[t - s] += d;                                                               \
    }                                                                                           \
    if (GX)                                                                                     \
        for (int p = 0; p < P; ++p) {                                                           \
            ST(gx + p * step, LD(gx + p * step) + acc[p][0]);                                   \
            ST(gx + p * step + 8, LD(gx + p * step + 8) + acc[p][1]);                           \
        }                                                                                       \
}
DEFINE_BWD_TILE(bwd_both2, 2, 1, 1)
DEFINE_BWD_TILE(bwd_both1, 1, 1, 1)
DEFINE_BWD_TILE(bwd_gx2, 2, 1, 0)
DEFINE_BWD_TILE(bwd_gx1, 1, 1, 0)
DEFINE_BWD_TILE(bwd_dw2, 2, 0, 1)
DEFINE_BWD_TILE(bwd_dw1, 1, 0, 1)

/* bptr [C * kh * kw + 1]: the taps grouped by (input channel, kernel offset), output channel
   ascending within a group; brow: their output channels, bperm: their positions in w / dw.
   dw must be zeroed by the caller; gx (padded [C, Hp, Wp, B]) is zeroed here, each channel by
   the thread that first writes it (one pass fewer over a fresh buffer). Either may be NULL. */
int conv_backward(const int64_t *g, const int64_t *bptr, const int32_t *brow, const int32_t *bperm,
                  const float *w, const float *gy, const float *x, float *gx, float *dw, int nthreads) {
    const int64_t C = g[G_C], Hp = g[G_HP], Wp = g[G_WP], Ho = g[G_HO], Wo = g[G_WO], B = g[G_B];
    const int64_t kw = g[G_KW], kk = g[G_KH] * kw, sh = g[G_SH], sw = g[G_SW], dh = g[G_DH], dwd = g[G_DW];
    const int64_t plane = Ho * Wo * B, step = sw * B, n_chunks = (B + BC - 1) / BC;
    /* per thread: a group's per-tap partial sums (a group holds at most O taps) */
    v8 *dacc_all = malloc((nthreads * g[G_O] + 1) * sizeof(v8));
    if (!dacc_all) return -1;
    #pragma omp parallel num_threads(nthreads)
    {
    v8 *dacc = dacc_all + omp_get_thread_num() * g[G_O];
    for (int64_t bc = 0; bc < n_chunks; ++bc)
        for (int64_t oh = 0; oh < Ho; ++oh) {
            const int64_t b0 = bc * BC, nb = B - b0 < BC ? B - b0 : BC;
            const float *gyrow = gy + oh * Wo * B + b0;   /* output channel 0, position (oh, 0) */
            #pragma omp for schedule(dynamic, 1)
            for (int64_t c = 0; c < C; ++c) {
                /* the first item visits every channel: zero its plane before any write (the
                   barrier after each item orders it before the other threads' later writes) */
                if (gx && bc == 0 && oh == 0) memset(gx + c * Hp * Wp * B, 0, Hp * Wp * B * sizeof(float));
                for (int64_t k = 0; k < kk; ++k) {
                    const int64_t s = bptr[c * kk + k], e = bptr[c * kk + k + 1];
                    if (s == e) continue;
                    const int64_t i = k / kw, j = k % kw;
                    const int64_t in0 = ((c * Hp + oh * sh + i * dh) * Wp + j * dwd) * B + b0;
                    const float *xin = x + in0;
                    float *gxin = gx ? gx + in0 : NULL;
                    int64_t ow = 0;
                    if (nb == BC) {
                        if (dw) for (int64_t t = 0; t < e - s; ++t) dacc[t] = (v8){0};
                        #define BWD_ROW(KIND)                                                                       \
                            for (; ow + 2 <= Wo; ow += 2)                                                           \
                                bwd_##KIND##2(s, e, brow, bperm, w, gyrow + ow * B, plane, xin + ow * step,         \
                                              gxin ? gxin + ow * step : NULL, step, B, dacc);                       \
                            for (; ow < Wo; ++ow)                                                                   \
                                bwd_##KIND##1(s, e, brow, bperm, w, gyrow + ow * B, plane, xin + ow * step,         \
                                              gxin ? gxin + ow * step : NULL, step, B, dacc);
                        if (gx && dw) { BWD_ROW(both) }
                        else if (gx) { BWD_ROW(gx) }
                        else { BWD_ROW(dw) }
                        #undef BWD_ROW
                        if (dw) for (int64_t t = s; t < e; ++t) dw[bperm[t]] += hsum(dacc[t - s]);
                    }
                    for (; ow < Wo; ++ow)
                        for (int64_t t = s; t < e; ++t) {
                            const float *gp = gyrow + brow[t] * plane + ow * B;
                            const int32_t q = bperm[t];
                            float d = 0.0f;
                            for (int64_t u = 0; u < nb; ++u) {
                                if (gx) gxin[ow * step + u] = __builtin_fmaf(w[q], gp[u], gxin[ow * step + u]);
                                if (dw) d = __builtin_fmaf(gp[u], xin[ow * step + u], d);
                            }
                            if (dw) dw[q] += d;
                        }
                }
            }
        }
    }
    free(dacc_all);
    return 0;
}

/* Layout conversions, parallel over (channel, row), moving 8 samples x 8 pixels at a time
   through an in-register 8x8 transpose (torch's strided copy walks the batch at a stride of
   C * H * W, one element at a time). to_batch_inner: src [B, C, H, W] with any strides (NCHW,
   channels_last, a view) into dst [C, H + 2 ph, W + 2 pw, B] with a zero border;
   from_batch_inner: the interior of src [C, Hp, Wp, B] (offset ph, pw) into a contiguous NCHW
   dst [B, C, H, W]. The batch-innermost row (Wp * B floats) stays in L1 meanwhile. */
void to_batch_inner(int64_t B, int64_t C, int64_t H, int64_t W, const int64_t *st, const float *src,
                    int64_t ph, int64_t pw, float *dst, int nthreads) {
    const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, sb = st[0], sw = st[3];
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < C; ++c)
        for (int64_t hp = 0; hp < Hp; ++hp) {
            float *d = dst + (c * Hp + hp) * Wp * B;
            const int64_t h = hp - ph;
            if (h < 0 || h >= H) { memset(d, 0, Wp * B * sizeof(float)); continue; }
            memset(d, 0, pw * B * sizeof(float));
            memset(d + (pw + W) * B, 0, pw * B * sizeof(float));
            d += pw * B;
            const float *s = src + c * st[1] + h * st[2];
            int64_t b = 0;
            if (sw == 1)
                for (; b + 8 <= B; b += 8) {
                    int64_t w = 0;
                    for (; w + 8 <= W; w += 8) {
                        v8 r[8];
                        for (int i = 0; i < 8; ++i) r[i] = LD(s + (b + i) * sb + w);
                        transpose8(r);
                        for (int j = 0; j < 8; ++j) ST(d + (w + j) * B + b, r[j]);
                    }
                    for (; w < W; ++w)
                        for (int i = 0; i < 8; ++i) d[w * B + b + i] = s[(b + i) * sb + w];
                }
            for (; b < B; ++b)
                for (int64_t w = 0; w < W; ++w) d[w * B + b] = s[b * sb + w * sw];
        }
}

void from_batch_inner(int64_t B, int64_t C, int64_t H, int64_t W, const float *src, int64_t ph,
                      int64_t pw, float *dst, int nthreads) {
    const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, sb = C * H * W;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < C; ++c)
        for (int64_t h = 0; h < H; ++h) {
            const float *s = src + ((c * Hp + h + ph) * Wp + pw) * B;
            float *d = dst + (c * H + h) * W;
            int64_t b = 0;
            for (; b + 8 <= B; b += 8) {
                int64_t w = 0;
                for (; w + 8 <= W; w += 8) {
                    v8 r[8];
                    for (int j = 0; j < 8; ++j) r[j] = LD(s + (w + j) * B + b);
                    transpose8(r);
                    for (int i = 0; i < 8; ++i) ST(d + (b + i) * sb + w, r[i]);
                }
                for (; w < W; ++w)
                    for (int i = 0; i < 8; ++i) d[(b + i) * sb + w] = s[w * B + b + i];
            }
            for (; b < B; ++b)
                for (int64_t w = 0; w < W; ++w) d[b * sb + w] = s[w * B + b];
        }
}
"""

_failure: str | None = None
# per topology: the taps grouped by (input channel, kernel offset) for the backward
_BACKWARD_ORDER: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


def _geometry(x_p: torch.Tensor, out_channels: int, out_size, kernel_size, stride, dilation) -> torch.Tensor:
    c, hp, wp, batch = x_p.shape
    return torch.tensor([c, hp, wp, out_channels, *out_size, batch, *kernel_size, *stride, *dilation],
                        dtype=torch.int64)


def _backward_order(topo, in_channels: int, taps_per_channel: int):
    """``(bptr, brow, bperm)``: the taps by (input channel, kernel offset), then output channel."""
    key = (in_channels, taps_per_channel)
    cached = _BACKWARD_ORDER.get(topo)
    if cached is None or cached[0] != key:
        col = topo.col.long()
        perm = torch.sort(col, stable=True).indices   # stable: output channel ascending in a group
        counts = torch.bincount(col, minlength=in_channels * taps_per_channel)
        bptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        cached = (key, (bptr, topo.row[perm].contiguous(), perm.to(torch.int32)))
        _BACKWARD_ORDER[topo] = cached
    return cached[1]


class ConvKernels:
    """The compiled loops, called on float32 CPU tensors; activations cross into the
    batch-innermost layout in :meth:`to_batch_inner` and back in :meth:`to_nchw`."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        p, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._forward = lib.conv_forward
        self._forward.argtypes = [p, p, p, p, p, p, p, cint]
        self._forward.restype = cint
        self._backward = lib.conv_backward
        self._backward.argtypes = [p, p, p, p, p, p, p, p, p, cint]
        self._backward.restype = cint
        self._to_inner = lib.to_batch_inner
        self._to_inner.argtypes = [i64, i64, i64, i64, p, p, i64, i64, p, cint]
        self._to_inner.restype = None
        self._from_inner = lib.from_batch_inner
        self._from_inner.argtypes = [i64, i64, i64, i64, p, i64, i64, p, cint]
        self._from_inner.restype = None

    @staticmethod
    def supports(x: torch.Tensor, padding) -> bool:
        """Whether the int32 pixel offsets reach every padded input pixel of ``x`` [B, C, H, W]."""
        _, c, h, w = x.shape
        return c * (h + 2 * padding[0]) * (w + 2 * padding[1]) < 2**31

    def to_batch_inner(self, x: torch.Tensor, padding=(0, 0)) -> torch.Tensor:
        """``x`` [B, C, H, W] (any strides) as a contiguous ``[C, H + 2 ph, W + 2 pw, B]`` copy
        with a zero border."""
        batch, c, h, w = x.shape
        ph, pw = padding
        out = hugepages.empty(c, h + 2 * ph, w + 2 * pw, batch)
        if out.numel():
            strides = torch.tensor(x.stride(), dtype=torch.int64)
            self._to_inner(batch, c, h, w, strides.data_ptr(), x.data_ptr(), ph, pw, out.data_ptr(),
                           torch.get_num_threads())
        return out

    def to_nchw(self, src: torch.Tensor, padding=(0, 0)) -> torch.Tensor:
        """The interior of batch-innermost ``src`` [C, Hp, Wp, B] as a contiguous NCHW tensor."""
        c, hp, wp, batch = src.shape
        ph, pw = padding
        h, w = hp - 2 * ph, wp - 2 * pw
        out = hugepages.empty(batch, c, h, w)
        if out.numel():
            self._from_inner(batch, c, h, w, src.data_ptr(), ph, pw, out.data_ptr(), torch.get_num_threads())
        return out

    def forward(self, x_p: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, topo,
                kernel_size, stride, dilation, out_size) -> torch.Tensor:
        """The convolution of padded batch-innermost ``x_p`` [C, Hp, Wp, B], written as
        contiguous NCHW [B, O, Ho, Wo] (what BatchNorm, the usual next op, reads fastest)."""
        batch, (ho, wo), out_ch = x_p.shape[3], out_size, topo.out_channels
        y = hugepages.empty(batch, out_ch, ho, wo)
        if y.numel() == 0:
            return y
        g = _geometry(x_p, out_ch, out_size, kernel_size, stride, dilation)
        values = values.detach().contiguous()
        bias = None if bias is None else bias.detach().contiguous()
        if self._forward(g.data_ptr(), topo.crow.data_ptr(), topo.col.data_ptr(), values.data_ptr(),
                         x_p.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                         torch.get_num_threads()) != 0:
            raise MemoryError("conv_forward: no memory for the tap offsets")
        return y

    def backward(self, x_p: torch.Tensor, values: torch.Tensor, topo, grad_y: torch.Tensor, kernel_size,
                 stride, padding, dilation, want_x: bool, want_v: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(grad_x [B, C, H, W] contiguous, grad_values [N])`` (None where not wanted) from
        ``grad_y`` [B, O, Ho, Wo] (any strides) and the forward's padded input ``x_p``."""
        gx = hugepages.empty_like(x_p) if want_x else None   # zeroed by conv_backward
        gv = hugepages.empty_like(values).zero_() if want_v else None
        if not ((want_x or want_v) and grad_y.numel() and values.numel()):
            if gx is not None:
                gx.zero_()
        else:
            gy = self.to_batch_inner(grad_y)   # [O, Ho, Wo, B]
            bptr, brow, bperm = _backward_order(topo, x_p.shape[0], kernel_size[0] * kernel_size[1])
            g = _geometry(x_p, topo.out_channels, grad_y.shape[2:], kernel_size, stride, dilation)
            values = values.detach().contiguous()
            if self._backward(g.data_ptr(), bptr.data_ptr(), brow.data_ptr(), bperm.data_ptr(), values.data_ptr(),
                              gy.data_ptr(), x_p.data_ptr(), None if gx is None else gx.data_ptr(),
                              None if gv is None else gv.data_ptr(), torch.get_num_threads()) != 0:
                raise MemoryError("conv_backward: no memory for the per-thread partial sums")
        return (None if gx is None else self.to_nchw(gx, padding)), gv


@functools.lru_cache(maxsize=1)
def load() -> ConvKernels | None:
    """The compiled kernels, or None (once, with a warning) when they cannot be built; never raises."""
    global _failure
    kernels, _failure = _cbuild.load_or_none("sparse_conv", _SOURCE, _cbuild.OPENMP_FLAG_SETS,
                                             lambda lib, path, flags: ConvKernels(lib, path),
                                             "SparseConv2d kernels", "falling back to the torch route")
    return kernels


def load_for(*tensors: torch.Tensor | None) -> ConvKernels | None:
    """The kernels when every given tensor is float32 on the CPU (None entries ignored), else None."""
    if all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors):
        return load()
    return None


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None, else None (calls ``load()`` first)."""
    load()
    return _failure
