"""SparseConv2d: an always-sparse 2-D convolution (values + indices; no dense kernel ever).

The kernel [out, in, kh, kw] is stored as its N active taps: ``values`` [N] (the only weight
parameter) and int32 ``row_indices`` (output channel) / ``col_indices`` (``c * kh * kw +
i * kw + j``, the dense kernel's flattened [in * kh * kw] index) [N], sorted by (row, col),
the same conventions as :class:`~regrow.nn.SparseLinear`.

Formulation: direct sparse convolution grouped by kernel offset. For each offset (i, j) that
holds active taps, the input channels those taps read are sliced at that offset (stride and
dilation applied): an implicit im2col of one offset and only the needed channels, never of the
whole input. A CSR matrix [out, needed channels] of that offset's taps multiplies the slice and
accumulates into the output. The input gradient is the transposed product scattered back at the
same offset; the weight gradient is computed for the active taps only (a sampled product of
output gradients and input slices, :func:`~regrow.nn.sparse_linear.sampled_grad`). Nothing of
size out x in x kh x kw is created, in the forward or the backward.

Kernels: for float32 on the CPU the forward and both gradients run in compiled loops instead
(:mod:`regrow.nn._conv_kernels`: a direct sparse convolution over each output channel's taps on
a batch-innermost copy of the input; output and input gradient come back as contiguous NCHW);
the route above is the fallback (no compiler, ``REGROW_DISABLE_KERNEL=1``, other dtypes or
devices) and the reference it is tested against.

On the torch route the output is laid out channel-major in memory ([out, B, Ho, Wo] storage, shape [B, out, Ho,
Wo]; not a view): a following SparseConv2d reads it without a copy. Call ``.contiguous()`` if a
later op needs NCHW storage.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from . import _conv_kernels
from ._indexed import IndexedWeights
from .sparse_linear import _autocast_enabled, sampled_grad

_MAX_INDEX = 2**31 - 1   # int32 indices


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _Offset:
    """The active taps at one kernel offset (i, j): positions in ``values``, their output
    channels, and the input channels they read, as a CSR pattern [out, needed channels] and its
    transpose [needed channels, out]."""

    def __init__(self, i: int, j: int, pos: torch.Tensor, out_ch: torch.Tensor, in_ch: torch.Tensor, rows: int):
        self.i, self.j, self.rows = i, j, rows
        self.pos = pos                                          # int64 [n], CSR order
        self.channels, local = torch.unique(in_ch, return_inverse=True)   # sorted needed channels
        self.out_ch = out_ch.to(torch.int32)
        self.local = local.to(torch.int32)                     # index into self.channels
        counts = torch.bincount(out_ch, minlength=rows)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.local_long = local
        # the transpose: taps sorted by (needed channel, out channel); stable keeps out order
        self.perm = torch.sort(local, stable=True).indices
        t_counts = torch.bincount(local, minlength=self.channels.numel())
        self.t_crow = torch.cat([t_counts.new_zeros(1), t_counts.cumsum(0)])
        self.t_col = out_ch[self.perm]

    def weight(self, values: torch.Tensor) -> torch.Tensor:
        """This offset's taps as a CSR matrix [out, needed channels]."""
        return _csr(self.crow, self.local_long, values[self.pos], (self.rows, self.channels.numel()))

    def weight_t(self, values: torch.Tensor) -> torch.Tensor:
        """Its transpose, CSR [needed channels, out]."""
        return _csr(self.t_crow, self.t_col, values[self.pos[self.perm]], (self.channels.numel(), self.rows))


class _ConvTopology:
    """The taps grouped by kernel offset; immutable, rebuilt after a rewire (a forward's saved
    topology stays valid if the layer is rewired before its backward)."""

    def __init__(self, row: torch.Tensor, col: torch.Tensor, out_channels: int, kernel_size: tuple[int, int]):
        self.row, self.col, self.out_channels = row, col, out_channels
        self.kernel_size = kernel_size
        kh, kw = kernel_size
        row_l, col_l = row.long(), col.long()
        offset, in_ch = col_l % (kh * kw), col_l // (kh * kw)
        # the taps' CSR row pointer over [out, in * kh * kw] (the sparse backend locates taps by it)
        counts = torch.bincount(row_l, minlength=out_channels)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.offsets: list[_Offset] = []
        for k in torch.unique(offset).tolist():
            pos = (offset == k).nonzero().squeeze(1)   # keeps the (row, col) order
            self.offsets.append(_Offset(k // kw, k % kw, pos, row_l[pos], in_ch[pos], out_channels))


def _offset_slice(x_t: torch.Tensor, i: int, j: int, geometry) -> torch.Tensor:
    """The view of padded channel-major input ``x_t`` [C, B, Hp, Wp] that the taps at kernel
    offset (i, j) read, over every output position: [C, B, Ho, Wo] (all channels; a view, no copy)."""
    (sh, sw), (dh, dw), (ho, wo) = geometry
    r0, c0 = i * dh, j * dw
    return x_t[:, :, r0:r0 + sh * (ho - 1) + 1:sh, c0:c0 + sw * (wo - 1) + 1:sw]


def _offset_columns(x_t: torch.Tensor, i: int, j: int, channels: torch.Tensor, geometry) -> torch.Tensor:
    """The input ``channels`` at kernel offset (i, j) over every output position, as a matrix
    [channels, B * Ho * Wo]: one offset's implicit im2col, for the needed channels only."""
    return _offset_slice(x_t, i, j, geometry)[channels].reshape(channels.numel(), -1)


class _Capture:
    """The inputs and output gradients of every call in one armed step, kept as the layer
    computes with them: padded channel-major inputs [C, B, Hp, Wp] (the tensor the forward saves
    for its backward anyway, so keeping it costs nothing) and output gradients [out, B * Ho * Wo]."""

    def __init__(self):
        self.x: list[torch.Tensor] = []
        self.dy: dict[int, torch.Tensor] = {}
        self.out_sizes: list[tuple[int, int]] = []

    def calls(self) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] | None:
        """``(x_t, dy_t, (Ho, Wo))`` per call, or None if a call has no output gradient yet."""
        if not self.x or len(self.dy) != len(self.x):
            return None
        return [(self.x[i], self.dy[i], self.out_sizes[i]) for i in range(len(self.x))]


class _SparseConv2dFunction(torch.autograd.Function):
    """y = conv2d(x, W) + b with W given by (values, topology); gradients for x, values, bias."""

    @staticmethod
    def forward(ctx, x, values, bias, topo: _ConvTopology, stride, padding, dilation, out_size,
                capture: _Capture | None):
        (ph, pw) = padding
        batch, _, h, w = x.shape
        geometry = (stride, dilation, out_size)
        kernels = _conv_kernels.load_for(x, values, bias)
        if kernels is not None and kernels.supports(x, padding):
            # compiled direct convolution on a padded batch-innermost copy [C, Hp, Wp, B]; its
            # [C, B, Hp, Wp] view is what the capture reads (the torch route's layout)
            x_p = kernels.to_batch_inner(x, padding)
            y = kernels.forward(x_p, values, bias, topo, topo.kernel_size, stride, dilation, out_size)
            x_t = x_p.permute(0, 3, 1, 2)
        else:
            kernels = None
            # channel-major, padded once: [C, B, Hp, Wp] (a copy of the input's size)
            x_t = x.permute(1, 0, 2, 3)
            x_t = F.pad(x_t, (pw, pw, ph, ph)) if ph or pw else x_t.contiguous()
            ho, wo = out_size
            y_t = torch.zeros(topo.out_channels, batch * ho * wo, dtype=x.dtype, device=x.device)
            for off in topo.offsets:
                cols = _offset_columns(x_t, off.i, off.j, off.channels, geometry)
                y_t.add_(torch.sparse.mm(off.weight(values), cols))
            if bias is not None:
                y_t.add_(bias[:, None])
            # shape [B, out, Ho, Wo] stored as [out, B, Ho, Wo]: not a view, so in-place ops after
            # the layer are allowed, and a following SparseConv2d reads it channel-major for free
            out_ch = y_t.shape[0]
            y = torch.empty_strided((batch, out_ch, ho, wo), (ho * wo, batch * ho * wo, wo, 1),
                                    dtype=x.dtype, device=x.device)
            y.permute(1, 0, 2, 3).copy_(y_t.view(out_ch, batch, ho, wo))
        ctx.kernels = kernels
        ctx.save_for_backward(x_t, values)
        ctx.topo, ctx.geometry, ctx.padding = topo, geometry, padding
        ctx.in_size, ctx.has_bias = (h, w), bias is not None
        ctx.capture = capture
        if capture is not None:
            ctx.call = len(capture.x)
            capture.x.append(x_t)
            capture.out_sizes.append(out_size)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        # a backward called inside an autocast region must not recast the sparse products
        with torch.autocast(grad_y.device.type, enabled=False):
            return _SparseConv2dFunction._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y):
        if ctx.kernels is not None:
            return _SparseConv2dFunction._backward_compiled(ctx, grad_y)
        x_t, values = ctx.saved_tensors
        topo: _ConvTopology = ctx.topo
        g_t = grad_y.permute(1, 0, 2, 3).reshape(grad_y.shape[1], -1)   # [out, B * Ho * Wo]
        if ctx.capture is not None:
            ctx.capture.dy[ctx.call] = g_t
        grad_x = grad_v = grad_b = None
        want_x, want_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx_t = torch.zeros_like(x_t) if want_x else None
        if want_v:
            grad_v = torch.zeros_like(values)
        batch, ho, wo = grad_y.shape[0], grad_y.shape[2], grad_y.shape[3]
        for off in topo.offsets:
            if want_v:
                cols = _offset_columns(x_t, off.i, off.j, off.channels, ctx.geometry)
                grad_v[off.pos] = sampled_grad(off.rows, off.out_ch, off.local, cols, g_t, crow=off.crow)
            if want_x:
                contrib = torch.sparse.mm(off.weight_t(values), g_t)   # [needed channels, B*Ho*Wo]
                _offset_slice(gx_t, off.i, off.j, ctx.geometry).index_add_(
                    0, off.channels, contrib.view(-1, batch, ho, wo))
        if want_x:
            (ph, pw), (h, w) = ctx.padding, ctx.in_size
            grad_x = gx_t[:, :, ph:ph + h, pw:pw + w].permute(1, 0, 2, 3)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_t.sum(1)
        return grad_x, grad_v, grad_b, None, None, None, None, None, None

    @staticmethod
    def _backward_compiled(ctx, grad_y):
        """Both gradients in one pass of the compiled loops (regrow.nn._conv_kernels)."""
        x_t, values = ctx.saved_tensors   # x_t: the [C, B, Hp, Wp] view of x_p [C, Hp, Wp, B]
        if ctx.capture is not None:
            ctx.capture.dy[ctx.call] = grad_y.permute(1, 0, 2, 3).reshape(grad_y.shape[1], -1)
        (stride, dilation, _), topo = ctx.geometry, ctx.topo
        grad_x, grad_v = ctx.kernels.backward(x_t.permute(0, 2, 3, 1), values, topo, grad_y, topo.kernel_size,
                                              stride, ctx.padding, dilation, *ctx.needs_input_grad[:2])
        grad_b = grad_y.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_v, grad_b, None, None, None, None, None, None


class SparseConv2d(IndexedWeights, nn.Module):
    """A 2-D convolution that stores only its active kernel taps.

    Same call as ``nn.Conv2d`` (zero padding, ``groups=1`` only), plus exactly one of:

    Args:
        density: fraction of the out x in x kh x kw taps that are active; N = round(density *
            total), spread over the output channels as evenly as possible (constant fan-in).
        fan_in: instead, the number of taps of every output channel (N = fan_in * out_channels).
        seed: seeds the initial topology and values.

    Initial values are U(-1/sqrt(k), 1/sqrt(k)) with k the mean number of taps per output
    channel (nn.Conv2d's default bound applied to the taps a channel really has); the bias uses
    the same bound. ``to_dense()`` gives the equivalent dense kernel (small layers, tests and
    export). Memory and time are O(N + input + output) per sample.
    """

    regrow_sparse_parameter = "values"
    _capture_type = _Capture

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, *, density: float | None = None,
                 fan_in: int | None = None, seed: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        for name, n in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_INDEX:
                raise ValueError(f"{name} must be a positive integer, got {n!r}")
        if groups != 1:
            raise NotImplementedError(f"SparseConv2d supports groups=1 only, got groups={groups!r}")
        if isinstance(padding, str):
            raise ValueError(f"SparseConv2d takes numeric padding, got {padding!r}")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        for name, pair, low in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1),
                                ("padding", self.padding, 0), ("dilation", self.dilation, 1)):
            if min(pair) < low:
                raise ValueError(f"{name} must be >= {low}, got {pair}")
        self.in_channels, self.out_channels, self.groups, self.seed = in_channels, out_channels, groups, seed
        taps = in_channels * self.kernel_size[0] * self.kernel_size[1]
        if taps > _MAX_INDEX:
            raise ValueError(f"in_channels * kh * kw = {taps} exceeds int32 indices")
        self._init_weights(density, fan_in, bias=bias, seed=seed, device=device, dtype=dtype,
                           units=("taps", "taps per output channel"), fan_in_limit="in_channels*kh*kw")

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, **conv_args) -> "SparseConv2d":
        """A SparseConv2d holding ``weight``'s [out, in, kh, kw] taps where ``mask`` is set
        (default: non-zeros); ``conv_args``: stride, padding, dilation. Reads the dense kernel
        once: for tests and conversions."""
        if weight.dim() != 4:
            raise ValueError(f"weight must be 4-D [out, in, kh, kw], got shape {tuple(weight.shape)}")
        mask = weight != 0 if mask is None else mask.to(torch.bool)
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
        out_c, in_c, kh, kw = weight.shape
        layer = cls(in_c, out_c, (kh, kw), bias=bias is not None, fan_in=1,
                    device=weight.device, dtype=weight.dtype, **conv_args)
        flat_w, flat_m = weight.detach().reshape(out_c, -1), mask.reshape(out_c, -1)
        row, col = flat_m.nonzero(as_tuple=True)   # row-major: sorted by (row, col)
        with torch.no_grad():
            layer._assign(row, col, flat_w[row, col].clone())
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    # -- reading ---------------------------------------------------------------------------
    @property
    def taps_per_channel(self) -> int:
        """in_channels * kh * kw: the dense fan-in (columns of the [out, in*kh*kw] view)."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def rows(self) -> int:
        return self.out_channels

    @property
    def cols(self) -> int:
        """Flat keys ``row * cols + col`` are positions in the flattened [out, in, kh, kw] kernel."""
        return self.taps_per_channel

    def to_dense(self) -> torch.Tensor:
        """The [out, in, kh, kw] kernel as a dense tensor (allocates it: small layers only)."""
        return self.dense_matrix().view(self.out_channels, self.in_channels, *self.kernel_size)

    def to_conv2d(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the dense kernel (zeros at inactive taps) and the same bias."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None,
                         device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.to_dense())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def topology(self) -> _ConvTopology:
        # rebuilt when the index buffers were replaced (a rewire, a load, ``.to(device)``)
        if self._topo is None or self._topo.row is not self.row_indices or self._topo.col is not self.col_indices:
            self._topo = _ConvTopology(self.row_indices, self.col_indices, self.out_channels, self.kernel_size)
        return self._topo

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        sizes = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                      zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride))
        if min(sizes) < 1:
            raise ValueError(f"input {h}x{w} is too small for kernel {self.kernel_size} with padding "
                             f"{self.padding} and dilation {self.dilation}")
        return sizes

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d expects [B, {self.in_channels}, H, W] inputs, got shape {tuple(x.shape)}")
        out_size = self.output_size(x.shape[2], x.shape[3])
        capture = self._capture_for_forward()
        args = (self.topology(), self.stride, self.padding, self.dilation, out_size, capture)
        if _autocast_enabled(x.device.type):
            # run the sparse products in the values' dtype (MKL has no bf16 CSR matmul)
            with torch.autocast(x.device.type, enabled=False):
                return _SparseConv2dFunction.apply(x.to(self.values.dtype), self.values, self.bias, *args)
        return _SparseConv2dFunction.apply(x, self.values, self.bias, *args)

    # -- used by the sparse backend (arm_capture / disarm_capture: IndexedWeights) ------------
    def captured(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """``(x [B, in, H, W], dy [B, out, Ho, Wo])`` of every call of the armed step (views of
        what the layer keeps, no copies), or None when nothing complete was captured."""
        calls = self._captured_calls()
        if calls is None:
            return None
        (ph, pw), out = self.padding, []
        for x_t, dy_t, (ho, wo) in calls:
            x = x_t[:, :, ph:x_t.shape[2] - ph, pw:x_t.shape[3] - pw].permute(1, 0, 2, 3)
            out.append((x, dy_t.view(dy_t.shape[0], -1, ho, wo).permute(1, 0, 2, 3)))
        return out

    def _captured_calls(self):
        return None if self._capture is None else self._capture.calls()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, nnz={self.nnz}, "
                f"density={self.density:.4g}, bias={self.bias is not None}")


def _calls(layer: SparseConv2d):
    calls = layer._captured_calls()
    if calls is None:
        raise RuntimeError("no inputs/output gradients were captured by this SparseConv2d at this step "
                           "(arm_capture() before the step's forward, and run its backward)")
    return calls


def captured_tap_grads(layer: SparseConv2d, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """dL/dw of the kernel taps ``(row, col)`` (output channel, ``c * kh * kw + i * kw + j``;
    active or not) from the armed step's captured calls.

    Taps are grouped by kernel offset; per offset, the asked input channels' slice at that offset
    is multiplied with the output gradients of the asked channels and summed over batch and
    positions (:func:`~regrow.nn.sparse_linear.sampled_grad`): O(B * Ho * Wo) per tap, no dense
    kernel gradient."""
    kh, kw = layer.kernel_size
    # distinct taps only (the sampled product's CSR pattern takes no repeats), sorted
    keys, inverse = torch.unique(row.reshape(-1).long() * layer.cols + col.reshape(-1).long(), return_inverse=True)
    row, col = keys // layer.cols, keys % layer.cols
    offset, in_ch = col % (kh * kw), col // (kh * kw)
    order = torch.argsort(offset)
    bounds = torch.searchsorted(offset[order], torch.arange(kh * kw + 1, device=col.device)).tolist()
    out = None
    for x_t, dy_t, out_size in _calls(layer):
        out = torch.zeros(row.numel(), dtype=x_t.dtype, device=x_t.device) if out is None else out
        geometry = (layer.stride, layer.dilation, out_size)
        for k in range(kh * kw):
            idx = order[bounds[k]:bounds[k + 1]]
            if idx.numel() == 0:
                continue
            channels, local = torch.unique(in_ch[idx], return_inverse=True)
            cols = _offset_columns(x_t, k // kw, k % kw, channels, geometry)
            out[idx] += sampled_grad(layer.out_channels, row[idx], local, cols, dy_t)
    return out[inverse]


def captured_grad_rows(layer: SparseConv2d, start: int, stop: int) -> torch.Tensor:
    """The dense kernel gradient of output channels ``start:stop`` as ``[stop - start, in * kh *
    kw]``, from the armed step's captured calls (a weight-gradient convolution of those channels'
    output gradients only): what RigL-family growth scans block by block."""
    shape = (stop - start, layer.in_channels, *layer.kernel_size)
    total = None
    for x_t, dy_t, (ho, wo) in _calls(layer):
        # x_t is already padded: convolve it with padding 0
        dy = dy_t[start:stop].view(stop - start, -1, ho, wo).permute(1, 0, 2, 3)
        g = torch.nn.grad.conv2d_weight(x_t.permute(1, 0, 2, 3), shape, dy, layer.stride, 0, layer.dilation)
        total = g if total is None else total.add_(g)
    return total.reshape(stop - start, -1)
