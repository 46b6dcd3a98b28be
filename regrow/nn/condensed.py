"""Inference-only sparse linear layers: ``CondensedLinear`` (constant fan-in) and ``CSRLinear``.

Both hold a sparse weight in a compact form, compute ``y = x W^T + b`` exactly as the masked
dense layer they came from (``from_dense``), and keep their tensors in ``state_dict`` as plain
dense tensors, so they save to safetensors and load without pickle.

``CondensedLinear`` is SRigL's condensed representation: every active output neuron has the
same fan-in k, so the weight is ``weight [rows, k]`` with input indices ``indices [rows, k]``
and ``y[b, o] = bias[o] + sum_j weight[o, j] * x[b, indices[o, j]]``. On the CPU, with float32
and no autograd, it runs a small compiled kernel (``regrow.nn._kernels``); otherwise, or if the
kernel cannot be built, plain PyTorch: a fused ``F.embedding_bag`` gather-sum for batches, a
``take``-multiply-sum for one sample (autograd-capable, any device).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import _kernels

__all__ = ["CondensedLinear", "CSRLinear", "index_dtype_for", "fan_in_counts", "has_constant_fan_in"]

BACKENDS = ("auto", "kernel", "torch")
# Below this many multiply-adds per call, forking OpenMP threads costs more than it saves.
_PARALLEL_MIN_MACS = 32768
_DTYPE_NAMES = {"int16": torch.int16, "int32": torch.int32, "int64": torch.int64}


def index_dtype_for(in_features: int) -> torch.dtype:
    """The smallest index dtype holding every column index: int16 below 32768 inputs, else int32."""
    return torch.int16 if in_features <= 32768 else torch.int32


def _dtype_from(value: torch.dtype | str | None, in_features: int) -> torch.dtype:
    if value is None:
        return index_dtype_for(in_features)
    if isinstance(value, str):
        if value not in _DTYPE_NAMES:
            raise ValueError(f"index_dtype must be one of {sorted(_DTYPE_NAMES)}, got {value!r}")
        value = _DTYPE_NAMES[value]
    if value not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"index_dtype must be int16, int32 or int64, got {value}")
    if value == torch.int16 and in_features > 32768:
        raise ValueError(f"int16 indices cannot address {in_features} inputs (at most 32768)")
    return value


def fan_in_counts(mask: torch.Tensor) -> torch.Tensor:
    """Active connections per output row of a 2-D (or ``[out, ...]``) mask."""
    return mask.reshape(mask.shape[0], -1).sum(1)


def has_constant_fan_in(mask: torch.Tensor) -> bool:
    """True when every output row with any active connection has the same number of them."""
    counts = fan_in_counts(mask)
    active = counts[counts > 0]
    return active.numel() == 0 or bool((active == active[0]).all())


def _row_major(row: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 ``row``, ``col`` and ``values`` sorted by (row, col), checked against ``shape``."""
    out_f, in_f = shape
    row, col = row.to(device=values.device, dtype=torch.int64), col.to(device=values.device, dtype=torch.int64)
    if not row.shape == col.shape == values.shape or row.dim() != 1:
        raise ValueError(f"row, col and values must be 1-D of one length, got {tuple(row.shape)}, "
                         f"{tuple(col.shape)}, {tuple(values.shape)}")
    if row.numel() and (int(row.min()) < 0 or int(row.max()) >= out_f or int(col.min()) < 0 or int(col.max()) >= in_f):
        raise ValueError(f"indices out of range for shape {tuple(shape)}")
    keys = row * in_f + col
    if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
        keys, order = keys.sort()
        if bool((keys[1:] == keys[:-1]).any()):
            raise ValueError("repeated (row, col) entries")
        row, col, values = row[order], col[order], values[order]
    return row, col, values


def _validate_after_load(module: nn.Module, _incompatible_keys: object) -> None:
    module.validate()  # a module-level function, so modules stay picklable


def _check_2d_float(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(t.shape)}")


class CondensedLinear(nn.Module):
    """Linear layer stored as ``weight [rows, fan_in]`` + ``indices [rows, fan_in]`` (inference).

    Args:
        in_features: input size.
        out_features: output size.
        fan_in: stored connections per row (k). Rows with fewer real connections are padded
            with weight 0 at index 0.
        bias: whether the layer has a bias of size ``out_features``.
        rows: number of stored rows; default ``out_features``. If smaller, buffer
            ``row_index [rows]`` names the outputs the rows produce, and the other outputs
            (ablated neurons that were kept in place) equal the bias.
        index_dtype: int16 (default when ``in_features <= 32768``), int32 or int64.

    ``backend`` ("auto", "kernel", "torch") picks the implementation; "auto" uses the
    compiled kernel when it applies (CPU, float32, no autograd) and "kernel" raises if not.
    Parameters are created with ``requires_grad=False``; set it to train through the layer
    (then the autograd-capable PyTorch path runs).
    """

    def __init__(self, in_features: int, out_features: int, fan_in: int, bias: bool = True,
                 rows: int | None = None, index_dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        rows = out_features if rows is None else int(rows)
        if min(in_features, out_features) < 1 or fan_in < 0 or not 0 <= rows <= out_features:
            raise ValueError(f"invalid CondensedLinear shape: in={in_features}, out={out_features}, "
                             f"fan_in={fan_in}, rows={rows}")
        if fan_in > in_features:
            raise ValueError(f"fan_in {fan_in} exceeds in_features {in_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fan_in, self.rows = int(fan_in), rows
        idt = _dtype_from(index_dtype, in_features)
        self.weight = nn.Parameter(torch.zeros(rows, fan_in, device=device, dtype=dtype or torch.float32),
                                   requires_grad=False)
        self.register_buffer("indices", torch.zeros(rows, fan_in, dtype=idt, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32),
                                  requires_grad=False) if bias else None)
        if rows < out_features:
            self.register_buffer("row_index", torch.arange(rows, device=device))
        else:
            self.row_index = None
        self.backend = "auto"
        self._torch_cache: tuple | None = None
        self.register_load_state_dict_post_hook(_validate_after_load)

    @property
    def index_dtype(self) -> torch.dtype:
        return self.indices.dtype

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   index_dtype: torch.dtype | str | None = None) -> "CondensedLinear":
        """Condense a dense ``[out, in]`` weight; ``mask`` (default ``weight != 0``) marks active entries.

        Rows with no active entry become kept-in-place ablated outputs (their output is the bias);
        rows with fewer than the largest fan-in are zero-padded. Column indices are ascending
        within each row (sequential reads of x where rows overlap).
        """
        _check_2d_float("weight", weight)
        weight = weight.detach()
        mask = (weight != 0) if mask is None else mask.detach().to(device=weight.device, dtype=torch.bool)
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        counts = mask.sum(1)
        active = (counts > 0).nonzero().squeeze(1)
        k = int(counts.max()) if counts.numel() else 0
        layer = cls(in_f, out_f, k, bias=bias is not None, rows=active.numel(), index_dtype=index_dtype,
                    device=weight.device, dtype=weight.dtype)
        m = mask[active]
        # stable sort on "inactive" puts the active columns first, in ascending column order
        order = torch.sort((~m).to(torch.uint8), dim=1, stable=True).indices[:, :k]
        valid = torch.arange(k, device=weight.device) < counts[active].unsqueeze(1)
        idx = torch.where(valid, order, torch.zeros_like(order))
        with torch.no_grad():
            layer.weight.copy_(torch.where(valid, weight[active].gather(1, idx), torch.zeros((), dtype=weight.dtype,
                                                                                               device=weight.device)))
            layer.indices.copy_(idx.to(layer.indices.dtype))
            if bias is not None:
                layer.bias.copy_(bias.detach())
            if layer.row_index is not None:
                layer.row_index.copy_(active)
        return layer

    @classmethod
    def from_indices(cls, row: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                     bias: torch.Tensor | None = None,
                     index_dtype: torch.dtype | str | None = None, *, pad: bool = False) -> "CondensedLinear":
        """Condense a weight given as its active entries (``values`` at ``(row, col)``, no repeats),
        every non-empty row with the same count; builds nothing of size ``out x in``.

        Gives the same layer as :meth:`from_dense` on the equivalent dense weight and mask: rows
        without entries become kept-in-place ablated outputs (their output is the bias). With
        ``pad``, rows with fewer entries than the largest are zero-padded (weight 0 at input 0)
        as :meth:`from_dense` pads them, instead of refused.

        Raises:
            ValueError: rows with different non-zero counts and no ``pad`` (use :class:`CSRLinear`).
        """
        row, col, values = _row_major(row, col, values.detach(), shape)
        out_f, in_f = shape
        counts = torch.bincount(row, minlength=out_f)
        active = (counts > 0).nonzero().squeeze(1)
        k = int(counts.max()) if counts.numel() else 0
        uneven = bool((counts[active] != k).any())
        if uneven and not pad:
            raise ValueError("CondensedLinear.from_indices needs the same number of entries in every non-empty row")
        layer = cls(in_f, out_f, k, bias=bias is not None, rows=active.numel(), index_dtype=index_dtype,
                    device=values.device, dtype=values.dtype)
        with torch.no_grad():
            if uneven:
                # entry j of row r goes to slot (stored row of r, j - first entry of r); the rest stay 0
                stored = torch.cumsum(counts > 0, 0) - 1
                slot = torch.arange(row.numel(), device=row.device) - (torch.cumsum(counts, 0) - counts)[row]
                layer.weight[stored[row], slot] = values
                layer.indices[stored[row], slot] = col.to(layer.indices.dtype)
            else:
                # row-major entries of rows with k each: row r's entries are one run of k, ascending columns
                layer.weight.copy_(values.view(active.numel(), k))
                layer.indices.copy_(col.view(active.numel(), k).to(layer.indices.dtype))
            if bias is not None:
                layer.bias.copy_(bias.detach())
            if layer.row_index is not None:
                layer.row_index.copy_(active)
        return layer

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense ``[out_features, in_features]`` weight."""
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        rows = dense if self.row_index is None else torch.zeros(self.rows, self.in_features, dtype=self.weight.dtype,
                                                                device=self.weight.device)
        rows.scatter_add_(1, self.indices.long(), self.weight.detach())
        if self.row_index is not None:
            dense[self.row_index] = rows
        return dense

    def validate(self) -> None:
        """Raise ValueError unless indices address valid inputs/outputs (the kernel trusts them)."""
        if self.indices.shape != (self.rows, self.fan_in) or self.weight.shape != (self.rows, self.fan_in):
            raise ValueError(f"CondensedLinear tensors have shapes weight {tuple(self.weight.shape)}, "
                             f"indices {tuple(self.indices.shape)}; expected ({self.rows}, {self.fan_in})")
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= self.in_features):
            raise ValueError(f"CondensedLinear indices out of range [0, {self.in_features})")
        if self.row_index is not None and self.rows and (
                int(self.row_index.min()) < 0 or int(self.row_index.max()) >= self.out_features):
            raise ValueError(f"CondensedLinear row_index out of range [0, {self.out_features})")
        self._torch_cache = None

    # -- forward ------------------------------------------------------------------------
    def _kernel_applies(self, x: torch.Tensor) -> bool:
        """The C kernel reads raw pointers: every tensor it touches must be a contiguous float32
        (int16/int32 indices) CPU tensor, or a CUDA module would hand it device addresses."""
        bias, weight, indices, row_index = self.bias, self.weight, self.indices, self.row_index
        if not (x.is_cpu and x.dtype == torch.float32
                and weight.is_cpu and weight.dtype == torch.float32 and weight.is_contiguous()
                and indices.is_cpu and indices.dtype in (torch.int16, torch.int32) and indices.is_contiguous()):
            return False
        if bias is not None and not (bias.is_cpu and bias.dtype == torch.float32 and bias.is_contiguous()):
            return False
        if row_index is not None and not row_index.is_cpu:   # bias[row_index] must stay on the CPU
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                 or (bias is not None and bias.requires_grad)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_f = self.in_features
        if x.shape[-1] != in_f:
            raise ValueError(f"CondensedLinear expects inputs with last dimension {in_f}, "
                             f"got shape {tuple(x.shape)}")
        x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
        kern = None
        if self.backend != "torch":
            kern = _kernels.load() if self._kernel_applies(x2) else None
            if kern is None and self.backend == "kernel":
                reason = _kernels.unavailable_reason() or (
                    "input or layer tensors are not contiguous float32 on the CPU without autograd")
                raise RuntimeError(f"CondensedLinear backend='kernel' cannot run: {reason}")
        bias, row_index = self.bias, self.row_index
        rows_bias = bias if bias is None or row_index is None else bias[row_index]
        batch = x2.shape[0]
        if self.rows == 0 or self.fan_in == 0 or batch == 0:
            z = x2.new_zeros(batch, self.rows)
            if rows_bias is not None:
                z = z + rows_bias
        elif kern is not None:
            z = torch.empty(batch, self.rows, dtype=torch.float32)
            macs = batch * self.rows * self.fan_in
            kern(x2.contiguous(), self.weight, self.indices, rows_bias, z,
                 torch.get_num_threads() if macs >= _PARALLEL_MIN_MACS else 1)
        else:
            z = self._forward_torch(x2, rows_bias)
        if row_index is not None:
            full = x2.new_zeros(batch, self.out_features) if bias is None else \
                bias.to(x2.dtype).expand(batch, -1).clone()
            z = full.index_copy(1, row_index, z)
        return z if x.dim() == 2 else z.reshape(*x.shape[:-1], self.out_features)

    def _torch_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.indices.data_ptr(), self.indices._version, self.indices.device)
        if self._torch_cache is None or self._torch_cache[0] != key:
            flat = self.indices.reshape(-1).long()
            offsets = torch.arange(0, self.rows * self.fan_in, self.fan_in, device=self.indices.device)
            self._torch_cache = (key, flat, offsets)
        return self._torch_cache[1], self._torch_cache[2]

    def _forward_torch(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat, offsets = self._torch_inputs()
        w = self.weight.to(x.dtype)
        if x.shape[0] == 1:
            # one sample: gather-multiply-sum measured 1.3-1.9x faster than embedding_bag here
            z = (w * x[0].take(flat.view(self.rows, self.fan_in))).sum(1).unsqueeze(0)
        else:
            # x.T as the embedding table: one bag per output row, weighted sum over its fan-in;
            # no [B, rows, k] intermediate is ever built
            z = F.embedding_bag(flat, x.t().contiguous(), offsets, mode="sum",
                                per_sample_weights=w.reshape(-1)).t()
        return z if bias is None else z + bias

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.fan_in}, "
             f"bias={self.bias is not None}, index_dtype={str(self.indices.dtype).replace('torch.', '')}")
        return s if self.row_index is None else s + f", rows={self.rows}"


class CSRLinear(nn.Module):
    """Linear layer with a ``torch.sparse_csr`` weight, for unstructured sparsity (inference).

    The CSR components are stored as plain tensors (``values`` parameter, ``crow_indices`` and
    ``col_indices`` buffers) so ``state_dict`` holds only dense tensors; the sparse tensor is
    assembled (no copy) at each call. Batch 1 uses ``torch.addmv``, which measured several
    times faster here than a CSR matmul against a one-column matrix.
    """

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = True,
                 index_dtype: torch.dtype | str | None = "int32",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if min(in_features, out_features) < 1 or not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"invalid CSRLinear shape: in={in_features}, out={out_features}, nnz={nnz}")
        idt = _dtype_from(index_dtype, in_features)
        if idt == torch.int16:
            raise ValueError("CSRLinear indices must be int32 or int64 (torch.sparse_csr needs them)")
        if idt == torch.int32 and max(nnz, in_features) >= 2**31:
            raise ValueError("int32 CSR indices cannot address this layer; use index_dtype='int64'")
        self.in_features, self.out_features, self.nnz = int(in_features), int(out_features), int(nnz)
        fdt = dtype or torch.float32
        self.values = nn.Parameter(torch.zeros(nnz, device=device, dtype=fdt), requires_grad=False)
        self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=idt, device=device))
        self.register_buffer("col_indices", torch.zeros(nnz, dtype=idt, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=fdt),
                                 requires_grad=False) if bias else None
        self._csr_cache: tuple | None = None
        if nnz:
            self.crow_indices[-1] = nnz  # an empty-but-valid layout until loaded
            self.col_indices.copy_(torch.arange(nnz, dtype=idt, device=device) % in_features)
            self.crow_indices.copy_(torch.clamp(torch.arange(out_features + 1, device=device) * in_features,
                                                max=nnz).to(idt))
        self.register_load_state_dict_post_hook(_validate_after_load)

    @property
    def index_dtype(self) -> torch.dtype:
        return self.col_indices.dtype

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   index_dtype: torch.dtype | str | None = "int32") -> "CSRLinear":
        """Store the active entries (``mask``, default ``weight != 0``) of a dense ``[out, in]`` weight."""
        _check_2d_float("weight", weight)
        weight = weight.detach()
        mask = (weight != 0) if mask is None else mask.detach().to(device=weight.device, dtype=torch.bool)
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        nz = mask.nonzero()  # row-major order: exactly CSR's order
        layer = cls(in_f, out_f, nz.shape[0], bias=bias is not None, index_dtype=index_dtype,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.values.copy_(weight[nz[:, 0], nz[:, 1]])
            layer.col_indices.copy_(nz[:, 1])
            crow = torch.zeros(out_f + 1, dtype=torch.int64, device=weight.device)
            crow[1:] = torch.cumsum(mask.sum(1), 0)
            layer.crow_indices.copy_(crow)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_indices(cls, row: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                     bias: torch.Tensor | None = None,
                     index_dtype: torch.dtype | str | None = "int32") -> "CSRLinear":
        """Store a weight given as its active entries (``values`` at ``(row, col)``, no repeats);
        builds nothing of size ``out x in``. Same layer as :meth:`from_dense` on the dense equivalent."""
        row, col, values = _row_major(row, col, values.detach(), shape)
        out_f, in_f = shape
        layer = cls(in_f, out_f, values.numel(), bias=bias is not None, index_dtype=index_dtype,
                    device=values.device, dtype=values.dtype)
        with torch.no_grad():
            layer.values.copy_(values)
            layer.col_indices.copy_(col)
            crow = torch.zeros(out_f + 1, dtype=torch.int64, device=values.device)
            crow[1:] = torch.cumsum(torch.bincount(row, minlength=out_f), 0)
            layer.crow_indices.copy_(crow)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def validate(self) -> None:
        """Raise ValueError unless the CSR structure is well formed (MKL trusts it)."""
        crow, col = self.crow_indices, self.col_indices
        if crow.shape != (self.out_features + 1,) or col.shape != (self.nnz,) or self.values.shape != (self.nnz,):
            raise ValueError(f"CSRLinear tensors have shapes crow {tuple(crow.shape)}, col {tuple(col.shape)}, "
                             f"values {tuple(self.values.shape)}; expected ({self.out_features + 1},), "
                             f"({self.nnz},), ({self.nnz},)")
        if int(crow[0]) != 0 or int(crow[-1]) != self.nnz or bool((crow[1:] < crow[:-1]).any()):
            raise ValueError("CSRLinear crow_indices are not a valid row-pointer array")
        if self.nnz and (int(col.min()) < 0 or int(col.max()) >= self.in_features):
            raise ValueError(f"CSRLinear col_indices out of range [0, {self.in_features})")

    def sparse_weight(self) -> torch.Tensor:
        """The weight as a ``torch.sparse_csr`` tensor sharing this module's storage."""
        parts = (self.crow_indices, self.col_indices, self.values)
        key = tuple((t.data_ptr(), t._version) for t in parts)
        if self._csr_cache is None or self._csr_cache[0] != key:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
                csr = torch.sparse_csr_tensor(*parts, (self.out_features, self.in_features), check_invariants=False)
            self._csr_cache = (key, csr)
        return self._csr_cache[1]

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense ``[out_features, in_features]`` weight."""
        return self.sparse_weight().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"CSRLinear expects inputs with last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        w = self.sparse_weight()
        if x2.shape[0] == 1:
            y = torch.addmv(self.bias, w, x2[0]) if self.bias is not None else torch.mv(w, x2[0])
            y = y.unsqueeze(0)
        elif self.bias is not None:
            y = torch.addmm(self.bias.unsqueeze(1), w, x2.t()).t()
        else:
            y = torch.mm(w, x2.t()).t()
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"bias={self.bias is not None}")
