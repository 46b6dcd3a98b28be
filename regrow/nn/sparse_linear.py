"""SparseLinear: an always-sparse linear layer (values + indices; nothing of size out x in).

The weight is stored as its N active entries: ``values`` [N] (the only weight parameter) and
int32 ``row_indices`` / ``col_indices`` [N], sorted by (row, col), i.e. CSR order. Forward and
backward cost O(B * N): the forward and the input gradient are CSR/CSC row loops, the weight
gradient is computed only for the N active entries (a sampled dense-dense product). Topology
updates go through :class:`regrow.backends.sparse.SparseLinearTarget`, which also never
builds an out x in tensor, so a layer can be far wider than a dense weight could be.

Activations flow through the layer feature-major: the output [B, out] is laid out as
``[out, B]`` in memory (strides ``(1, B)``; not a view, so in-place activations work), and a
following SparseLinear (after an elementwise activation, which keeps the layout) reads its
input without a copy. Call ``.contiguous()`` on the output if a later op needs row-major.

Kernels: compiled C loops (regrow.nn._sparse_kernels) for float32 on CPU; torch.sparse (CSR
matmuls and ``sampled_addmm``) otherwise (CUDA, float64, or no C compiler), same results.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import nn

from ..core import hugepages
from . import _sparse_kernels, _triton_kernels
from ._indexed import IndexedWeights, _even_counts, constant_fan_in  # noqa: F401  (public here too)

_MAX_FEATURES = 2**31 - 1   # int32 indices

# Once the gathered activations (rows x B floats) outgrow the caches, the kernels gather from
# one panel of rows at a time (see spmm_rows in _sparse_kernels); a panel holds about this many
# bytes. 4-8 MiB measured fastest here (2 MiB L2 per core, a 105 MiB L3 shared with other
# tenants): the kernels ran about 1.6x faster than with unpanelled gathers at width 256k.
# Every row's partial sum is read and written once per panel, so a row needs several entries
# per panel for panels to pay: at least _MIN_PER_PANEL on average, else fewer, larger panels.
def _panel_bytes_from_env() -> int:
    text = os.environ.get("REGROW_PANEL_BYTES", "").strip()
    if not text:
        return 8 << 20
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"REGROW_PANEL_BYTES must be a positive number of bytes, got {text!r}")
    return value


_PANEL_BYTES = _panel_bytes_from_env()
_MIN_PER_PANEL = 4


def panel_split(gathered: int, batch: int, nnz: int, rows: int) -> tuple[int, int]:
    """``(n_panels, panel)``: how a pass over ``rows`` compressed rows holding ``nnz`` entries
    splits the ``gathered`` rows (``batch`` floats each) it gathers from. The panel length is
    a power of two, so nearby batch sizes share one panel-major structure."""
    per_panel = max(1, _PANEL_BYTES // (4 * max(1, batch)))
    panel = 1 << (per_panel.bit_length() - 1)
    n = min(-(-gathered // panel), nnz // (_MIN_PER_PANEL * max(1, rows)))
    if n < 2:
        return 1, gathered
    panel = -(-gathered // n)
    return -(-gathered // panel), panel


class _Topology:
    """Index structures of one topology, rebuilt after each rewire; immutable, so a forward's
    saved topology stays valid even if the layer is rewired before its backward. The CSC view
    (for input gradients) is built on first use: a first layer never needs it."""

    def __init__(self, row: torch.Tensor, col: torch.Tensor, rows: int, cols: int):
        self.rows, self.cols = rows, cols
        self.row, self.col = row, col
        counts = torch.bincount(row.long(), minlength=rows) if row.numel() else torch.zeros(rows, dtype=torch.long, device=row.device)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self._csc: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._panels: dict[tuple, tuple] = {}

    @staticmethod
    def _sorted_by(kernels: _sparse_kernels.SparseKernels, a: torch.Tensor, b: torch.Tensor, panel: int,
                   nb: int, n_panels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries in (panel of ``a``, ``b``, CSR position) order, a counting sort:
        ``(ptr [n_panels * nb + 1], a in that order, order)``."""
        ptr, order = kernels.bucket_order(a, b, panel, nb, n_panels)
        return ptr, kernels.permute(a, order), order

    def csc(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ccol int64 [cols + 1], row int32 [N] in column order, perm int32 [N]: CSR position
        of each CSC entry)."""
        if self._csc is None:
            kernels = _sparse_kernels.load() if self.col.device.type == "cpu" else None
            if kernels is not None:   # one panel holding every row: sorted by column, O(N + cols)
                self._csc = self._sorted_by(kernels, self.row, self.col, max(1, self.rows), self.cols, 1)
            else:
                counts = torch.bincount(self.col.long(), minlength=self.cols) if self.col.numel() \
                    else torch.zeros(self.cols, dtype=torch.long, device=self.col.device)
                ccol = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
                # entries are sorted by (row, col): a stable sort by col alone gives (col, row) order
                perm = torch.sort(self.col, stable=True).indices.to(torch.int32)
                self._csc = (ccol, self.row[perm.long()].contiguous(), perm)
        return self._csc

    def _panel_major(self, kernels: _sparse_kernels.SparseKernels, batch: int, gathered: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """For a pass gathering by ``gathered`` ("col": the forward, over input features; "row":
        the input gradient, over output rows): ``(ptr, gathered index, CSR position, n_panels)``
        with the entries in (panel of the gathered index, other index, gathered index) order
        (:func:`panel_split`), cached per panel size; None when one panel would hold them all."""
        a, b = (self.col, self.row) if gathered == "col" else (self.row, self.col)
        a_size, b_size = (self.cols, self.rows) if gathered == "col" else (self.rows, self.cols)
        n, panel = panel_split(a_size, batch, a.numel(), b_size)
        if n == 1:
            return None
        key = (gathered, panel)
        if key not in self._panels:
            self._panels[key] = (*self._sorted_by(kernels, a, b, panel, b_size, n), n)
        return self._panels[key]

    def csr_for(self, kernels: _sparse_kernels.SparseKernels, batch: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """``(ptr, col, value perm or None, n_panels)`` for a forward at this batch size: the
        CSR structure, or its panel-major order over the input features."""
        return self._panel_major(kernels, batch, "col") or (self.crow, self.col, None, 1)

    def csc_for(self, kernels: _sparse_kernels.SparseKernels, batch: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(ccol, row, perm, n_panels)`` for an input gradient at this batch size: the CSC
        view of :meth:`csc`, or its panel-major order over the output rows, sorted straight
        from the CSR order (the plain CSC is then not built)."""
        return self._panel_major(kernels, batch, "row") or (*self.csc(), 1)

    # torch.sparse (the CUDA path) takes int64 indices: converted once per topology, not per call
    @functools.cached_property
    def col_long(self) -> torch.Tensor:
        return self.col.long()

    @functools.cached_property
    def _csc_long(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ccol, row_t, perm = self.csc()
        return ccol, row_t.long(), perm.long()

    def csr_tensor(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(self.crow, self.col_long, values, (self.rows, self.cols),
                                           check_invariants=False)

    def csc_as_csr_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """W^T as a CSR tensor [cols, rows]."""
        ccol, row_t, perm = self._csc_long
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(ccol, row_t, values[perm], (self.cols, self.rows),
                                           check_invariants=False)


class _Capture:
    """Inputs (feature-major h^T) and output gradients (delta^T) of every call in one step."""

    def __init__(self):
        self.h: list[torch.Tensor] = []
        self.delta: dict[int, torch.Tensor] = {}

    def pair(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(h^T [cols, B], delta^T [rows, B])`` over every call, or None if incomplete."""
        if not self.h or len(self.delta) != len(self.h):
            return None
        if len(self.h) == 1:
            return self.h[0], self.delta[0]
        return torch.cat(self.h, 1), torch.cat([self.delta[i] for i in range(len(self.h))], 1)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:   # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _use_kernel(*tensors: torch.Tensor) -> _sparse_kernels.SparseKernels | None:
    if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return _sparse_kernels.load()
    return None


def sampled_grad(topo_rows: int, r: torch.Tensor, c: torch.Tensor, h_t: torch.Tensor,
                 delta_t: torch.Tensor, crow: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_b delta[b, r_j] * h[b, c_j]`` for each pair (int32 ``r``, ``c``), from
    feature-major ``h^T [cols, B]`` and ``delta^T [rows, B]``; O(B) per pair. ``crow``: the
    row pointer when the pairs already are in CSR order (a layer's own topology)."""
    kernels = _use_kernel(h_t, delta_t)
    if kernels is not None:   # the compiled loop reads int32 indices
        return kernels.sddmm(r.to(torch.int32), c.to(torch.int32), delta_t.contiguous(), h_t.contiguous())
    if _triton_kernels.usable(h_t, delta_t):   # CUDA: any pair order, no sort
        return _triton_kernels.sddmm(r, c, delta_t, h_t)
    if crow is not None:
        # already sorted: no argsort, and no bincount, whose output size costs CUDA a host sync
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pattern = torch.sparse_csr_tensor(crow, c.long(), torch.zeros(c.numel(), dtype=h_t.dtype, device=h_t.device),
                                              (topo_rows, h_t.shape[0]), check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, delta_t, h_t.t(), beta=0.0).values()
    # torch.sparse route: sampled_addmm over a CSR pattern of the pairs, sorted row-major
    key = r.long() * h_t.shape[0] + c.long()
    order = torch.argsort(key)
    rs, cs = r.long()[order], c.long()[order]
    counts = torch.bincount(rs, minlength=topo_rows)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, cs, torch.zeros(rs.numel(), dtype=h_t.dtype, device=h_t.device),
                                          (topo_rows, h_t.shape[0]), check_invariants=False)
        vals = torch.sparse.sampled_addmm(pattern, delta_t, h_t.t(), beta=0.0).values()
    out = torch.empty_like(vals)
    out[order] = vals
    return out


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if contiguous, else a contiguous copy (on huge pages when large)."""
    if t.is_contiguous():
        return t
    if t.device.type != "cpu":
        return t.contiguous()
    return hugepages.empty_like(t).copy_(t)


class _SparseLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W given by (values, topology); gradients for x, values and bias."""

    @staticmethod
    def forward(ctx, x2d, values, bias, topo: _Topology, capture: _Capture | None):
        x_t = _contiguous(x2d.t())   # free when x is itself a feature-major view
        kernels = _use_kernel(x_t, values) if bias is None else _use_kernel(x_t, values, bias)
        batch = x_t.shape[1]
        # y [B, out] laid out feature-major (strides (1, B)): not a view, so in-place ops
        # after the layer (ReLU(inplace=True)) are allowed, and the next layer reads y^T free
        y = torch.empty_strided((batch, topo.rows), (1, batch), dtype=x_t.dtype, device=x_t.device)
        hugepages.advise(y)   # wide layers: 2 MiB pages for the randomly gathered rows
        if kernels is not None:
            ptr, col, perm, n_panels = topo.csr_for(kernels, batch)
            kernels.spmm_rows(ptr, col, values.contiguous(), perm, x_t,
                              None if bias is None else bias.contiguous(), out=y.t(), n_panels=n_panels)
        elif _triton_kernels.usable(x_t, values, *([] if bias is None else [bias])):
            _triton_kernels.spmm_rows(topo.crow, topo.col, values, None, x_t,
                                      None if bias is None else bias.contiguous(), out=y.t())
        else:
            y_t = torch.sparse.mm(topo.csr_tensor(values), x_t)
            y.t().copy_(y_t if bias is None else y_t + bias[:, None])
        ctx.save_for_backward(x_t, values)
        ctx.topo, ctx.has_bias = topo, bias is not None
        ctx.capture = capture
        if capture is not None:
            ctx.call = len(capture.h)
            capture.h.append(x_t)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        # a backward called inside an autocast region must not recast the sparse products
        with torch.autocast(grad_y.device.type, enabled=False):
            return _SparseLinearFunction._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y):
        x_t, values = ctx.saved_tensors
        topo: _Topology = ctx.topo
        g_t = _contiguous(grad_y.t())
        if ctx.capture is not None:
            ctx.capture.delta[ctx.call] = g_t
        kernels = _use_kernel(g_t, x_t, values)
        grad_x = grad_v = grad_b = None
        if kernels is not None and ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            ccol, row_t, perm, n_panels = topo.csc_for(kernels, g_t.shape[1])
            gx_t, grad_v = kernels.backward_fused(ccol, row_t, perm, values.contiguous(), g_t, x_t,
                                                  n_panels=n_panels)
            grad_x = gx_t.t()
        elif ctx.needs_input_grad[0]:
            if kernels is not None:
                ccol, row_t, perm, n_panels = topo.csc_for(kernels, g_t.shape[1])
                grad_x = kernels.spmm_rows(ccol, row_t, values.contiguous(), perm, g_t, None,
                                           n_panels=n_panels).t()
            elif _triton_kernels.usable(g_t, values):
                ccol, row_t, perm = topo.csc()
                grad_x = _triton_kernels.spmm_rows(ccol, row_t, values, perm, g_t, None).t()
            else:
                grad_x = torch.sparse.mm(topo.csc_as_csr_tensor(values), g_t).t()
        if ctx.needs_input_grad[1] and grad_v is None:
            grad_v = sampled_grad(topo.rows, topo.row, topo.col_long, x_t, g_t, crow=topo.crow) if kernels is None \
                else kernels.sddmm(topo.row, topo.col, g_t, x_t)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_t.sum(1)
        return grad_x, grad_v, grad_b, None, None


class SparseLinear(IndexedWeights, nn.Module):
    """A linear layer that stores only its active weights; DynamicSparsity rewires it in place.

    ``y = x W^T + b`` where W [out_features, in_features] is represented by ``values`` [N] at
    positions ``(row_indices, col_indices)``. Memory and time are O(N + B * (in + out)).

    Args:
        in_features, out_features: the dense shape's sizes.
        density: fraction of the out x in weights that are active; N = round(density * out * in),
            spread over the output neurons as evenly as possible (constant fan-in).
        fan_in: instead of ``density``, the number of inputs of every output neuron
            (N = fan_in * out_features): N then grows linearly with width.
        bias: learn an additive bias.
        seed: seeds the initial topology and the initial values.
        device, dtype: of the values and bias (indices are int32 on the same device).

    Initial values are U(-1/sqrt(k), 1/sqrt(k)) with k the neuron's actual fan-in: nn.Linear's
    default rule applied to the inputs a neuron really has (with the dense fan-in, a neuron with
    64 of 10^6 inputs would start with almost no signal). The bias uses the same bound.

    When the layer is handed to :class:`regrow.DynamicSparsity`, ``values`` is the sparsified
    parameter; the layer keeps its own N (the engine's density allocation does not apply).
    """

    regrow_sparse_parameter = "values"
    _capture_type = _Capture

    def __init__(self, in_features: int, out_features: int, density: float | None = None, *,
                 fan_in: int | None = None, bias: bool = True, seed: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_FEATURES:
                raise ValueError(f"{name} must be an integer in [1, 2**31 - 1], got {n!r}")
        self.in_features, self.out_features, self.seed = in_features, out_features, seed
        self._init_weights(density, fan_in, bias=bias, seed=seed, device=device, dtype=dtype,
                           units=("weights", "inputs per neuron"), fan_in_limit="in_features")

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> "SparseLinear":
        """A SparseLinear holding ``weight``'s entries where ``mask`` is set (default: non-zeros).

        Reads the dense [out, in] weight once; meant for tests and conversions of small layers.
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        mask = weight != 0 if mask is None else mask.to(torch.bool)
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, fan_in=1, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        row, col = mask.nonzero(as_tuple=True)   # row-major: sorted by (row, col)
        with torch.no_grad():
            layer._assign(row, col, weight.detach()[row, col].clone())
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    # -- reading ---------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.out_features

    @property
    def cols(self) -> int:
        return self.in_features

    def to_dense(self) -> torch.Tensor:
        """The [out, in] weight as a dense tensor (allocates out x in: small layers only)."""
        return self.dense_matrix()

    def topology(self) -> _Topology:
        # rebuilt when the index buffers were replaced: a rewire or a load resets it, and
        # ``.to(device)`` swaps the buffers, which would leave the cached CSR/CSC on the old device
        if self._topo is None or self._topo.row is not self.row_indices or self._topo.col is not self.col_indices:
            self._topo = _Topology(self.row_indices, self.col_indices, self.out_features, self.in_features)
        return self._topo

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        capture = self._capture_for_forward()
        if _autocast_enabled(x2d.device.type):
            # autocast hands over bf16/fp16 activations while the values stay fp32, and would
            # recast the sparse products too (MKL has no bf16 CSR matmul): run in the values' dtype
            with torch.autocast(x2d.device.type, enabled=False):
                y = _SparseLinearFunction.apply(x2d.to(self.values.dtype), self.values, self.bias,
                                                self.topology(), capture)
        else:
            y = _SparseLinearFunction.apply(x2d, self.values, self.bias, self.topology(), capture)
        return y if len(lead) == 1 else y.reshape(*lead, self.out_features)

    # -- used by the sparse backend (arm_capture / disarm_capture: IndexedWeights) ------------
    def captured(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(h^T [in, B], delta^T [out, B])`` of the armed step, or None."""
        return None if self._capture is None else self._capture.pair()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"density={self.density:.4g}, bias={self.bias is not None}")
