"""What SparseLinear and SparseConv2d share: a weight stored as its active entries only.

``values`` [N] (the one parameter) plus int32 ``row_indices`` / ``col_indices`` sorted by (row,
col), over the weight viewed as ``rows x cols`` (a conv kernel's input channels and taps are
flattened into ``cols``). The layer says what ``rows`` and ``cols`` are; this mixin gives the
counts, the random constant fan-in topology and initial values a new layer starts with, the
flat keys, the dense view for tests and export, and in-place rewiring / loading
with a different N.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _resize_parameter(param: nn.Parameter, data: torch.Tensor) -> None:
    """``param.data = data`` for data of another shape (N changed: SRigL's ablation, a load).

    The parameter's gradient accumulator remembers the old shape, and a graph still alive from
    the previous step (the loop's last ``loss``) keeps it alive, so the next backward would fail
    ("invalid gradient ... got [N'] but expected [N]"). torch drops the accumulator when the
    data's dtype changes, not its shape: pass through an empty tensor of another dtype first.
    """
    other = torch.float64 if data.dtype != torch.float64 else torch.float32
    param.data = torch.empty(0, dtype=other, device=data.device)
    param.data = data


def _even_counts(rows: int, nnz: int, gen: torch.Generator) -> torch.Tensor:
    """Per-row counts summing to nnz that differ by at most one (random rows get the extra)."""
    counts = torch.full((rows,), nnz // rows, dtype=torch.long)
    extra = nnz - int(counts.sum())
    if extra:
        counts[torch.randperm(rows, generator=gen)[:extra]] += 1
    return counts


def constant_fan_in(rows: int, cols: int, counts: torch.Tensor,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random connections with ``counts[r]`` distinct inputs in row r (counts differ by at most
    one), as (row, col) int64 sorted by (row, col); each row's inputs are a uniform subset.

    Cost O(N log k) for k = max fan-in when k <= cols / 2 (rejection of repeated columns);
    otherwise O(rows * cols), which is then at most 2N.
    """
    kmax = int(counts.max()) if rows else 0
    if kmax == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    if kmax > cols:
        raise ValueError(f"fan-in {kmax} exceeds in_features {cols}")
    if 2 * kmax > cols:
        # dense-ish: a uniform k-subset per row from random keys, in row chunks
        chunk = max(1, (1 << 22) // cols)
        picked = [torch.rand(min(chunk, rows - s), cols, generator=gen).argsort(1)[:, :kmax]
                  for s in range(0, rows, chunk)]
        col = torch.cat(picked).sort(1).values
    else:
        col = torch.randint(cols, (rows, kmax), generator=gen).sort(1).values
        while True:   # redraw repeated columns in the rows that have any
            dup = torch.zeros_like(col, dtype=torch.bool)
            dup[:, 1:] = col[:, 1:] == col[:, :-1]
            bad_rows = dup.any(1).nonzero().squeeze(1)
            if bad_rows.numel() == 0:
                break
            sub, sub_dup = col[bad_rows], dup[bad_rows]
            sub[sub_dup] = torch.randint(cols, (int(sub_dup.sum()),), generator=gen)
            col[bad_rows] = sub.sort(1).values
    keep = torch.ones_like(col, dtype=torch.bool)
    short = (counts < kmax).nonzero().squeeze(1)
    if short.numel():
        # drop one uniformly chosen input from each shorter row (a uniform subset of a uniform subset)
        if int((kmax - counts).max()) > 1:
            raise ValueError("constant_fan_in needs per-row counts that differ by at most one")
        keep[short, torch.randint(kmax, (short.numel(),), generator=gen)] = False
    row = torch.arange(rows).unsqueeze(1).expand(rows, kmax)
    return row[keep], col[keep]


class IndexedWeights:
    """Mixin for an ``nn.Module`` holding ``values``, ``row_indices``, ``col_indices`` and a
    cached topology ``_topo``; the class defines ``rows`` and ``cols``, and ``_capture_type``:
    what records one armed step's inputs and output gradients (read by the sparse backend)."""

    rows: int
    cols: int
    _capture_type: type
    _capture = None
    _armed = False

    # -- used by the sparse backend --------------------------------------------------------
    def arm_capture(self) -> None:
        """Record inputs and output gradients of the next training forward/backward."""
        self._armed = True
        self._capture = self._capture_type()

    def disarm_capture(self) -> None:
        self._armed = False
        self._capture = None

    def _capture_for_forward(self):
        """The record this forward adds to: only an armed training forward that computes the
        values' gradient (not an evaluation pass between steps)."""
        if self._armed and torch.is_grad_enabled() and self.values.requires_grad:
            return self._capture
        return None

    def _init_weights(self, density: float | None, fan_in: int | None, *, bias: bool, seed: int,
                      device, dtype, units: tuple[str, str], fan_in_limit: str) -> None:
        """Validate ``density`` / ``fan_in`` (exactly one), draw a random constant fan-in
        topology of ``rows x cols`` from ``seed`` and create ``values``, ``bias`` and the index
        buffers; ``units`` names an entry and a row's fan-in in the errors (e.g. ("weights",
        "inputs per neuron")), ``fan_in_limit`` what bounds ``fan_in`` (e.g. "in_features")."""
        rows, cols = self.rows, self.cols
        if (density is None) == (fan_in is None):
            raise ValueError(f"give exactly one of density (fraction of {units[0]} active) or fan_in ({units[1]})")
        if density is not None:
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
                raise ValueError(f"density must be a number in (0, 1], got {density!r}")
            nnz = max(1, round(density * rows * cols))
        else:
            if isinstance(fan_in, bool) or not isinstance(fan_in, int) or not 1 <= fan_in <= cols:
                raise ValueError(f"fan_in must be an integer in [1, {fan_in_limit}={cols}], got {fan_in!r}")
            nnz = fan_in * rows
        gen = torch.Generator().manual_seed(seed)
        row, col = constant_fan_in(rows, cols, _even_counts(rows, nnz, gen), gen)
        factory = {"device": device, "dtype": dtype}
        self.values = nn.Parameter(torch.empty(nnz, **factory))
        self.bias = nn.Parameter(torch.empty(rows, **factory)) if bias else None
        self.register_buffer("row_indices", row.to(device=device, dtype=torch.int32))
        self.register_buffer("col_indices", col.to(device=device, dtype=torch.int32))
        self._topo = None
        self.reset_parameters(gen)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Values and bias from U(-b, b), b = 1/sqrt(mean active inputs per output row)."""
        bound = self.init_bound()
        vals = torch.rand(self.values.shape, generator=generator, dtype=torch.float32) * 2 - 1
        self.values.copy_(vals * bound)
        if self.bias is not None:
            self.bias.copy_((torch.rand(self.rows, generator=generator) * 2 - 1) * bound)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / (self.rows * self.cols)

    def init_bound(self) -> float:
        """1/sqrt(mean fan-in): the bound of initial (and randomly regrown) values."""
        return 1.0 / math.sqrt(max(1.0, self.nnz / self.rows))

    def active_keys(self) -> torch.Tensor:
        """Flat indices ``row * cols + col`` of the active weights, sorted (int64)."""
        return self.row_indices.long() * self.cols + self.col_indices.long()

    def dense_matrix(self) -> torch.Tensor:
        """The weight as a dense ``rows x cols`` tensor (allocates it: small layers only)."""
        w = torch.zeros(self.rows, self.cols, dtype=self.values.dtype, device=self.values.device)
        w[self.row_indices.long(), self.col_indices.long()] = self.values.detach()
        return w

    @torch.no_grad()
    def _assign(self, row: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the topology (sorted by (row, col)) and values; keeps the Parameter object
        so optimizers keep holding it (in place when N is unchanged)."""
        dev = self.values.device
        self.row_indices = row.to(device=dev, dtype=torch.int32).contiguous()
        self.col_indices = col.to(device=dev, dtype=torch.int32).contiguous()
        values = values.to(device=dev, dtype=self.values.dtype)
        if values.shape == self.values.shape:
            self.values.copy_(values)
        else:
            _resize_parameter(self.values, values.contiguous())
        self._topo = None

    # -- checkpoints with a different N ----------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        vals = state_dict.get(prefix + "values")
        if vals is not None and vals.shape != self.values.shape:
            # a checkpoint of the same layer after a drop-only update: resize before copying
            with torch.no_grad():
                _resize_parameter(self.values, torch.empty_like(vals, device=self.values.device, dtype=self.values.dtype))
            # a gradient of the old entries means nothing for the loaded ones (and a later
            # backward could not accumulate into its shape)
            self.values.grad = None
            n = vals.numel()
            self.row_indices = torch.empty(n, dtype=torch.int32, device=self.values.device)
            self.col_indices = torch.empty(n, dtype=torch.int32, device=self.values.device)
        self._topo = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
