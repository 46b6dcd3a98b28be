"""Sparse backend: topology updates of a ``SparseLinear`` or ``SparseConv2d`` without any
out x in (x kh x kw) tensor.

Both layers store values + int32 (row, col) sorted by (row, col) (``regrow.nn._indexed``), so
everything but the gradients is shared (:class:`IndexedTarget`); a conv's rows are its output
channels and its columns ``in * kh * kw`` taps. The two targets differ only in how dL/dw is
computed from what the layer captured: ``delta^T h`` for a linear layer, a weight-gradient
convolution (sampled per tap, or per block of output channels) for a convolution.

Every operation is O(N) or O(m log N) for N active and m queried connections:

* active connections are the layer's sorted flat keys ``row * cols + col`` (int64), built
  once per update and dropped afterwards;
* ``is_active`` is a binary search (``searchsorted``) in those keys, which is what GSE's
  rejection sampler calls;
* ``grad_at`` computes dL/dw only for the asked pairs, ``sum_b delta[b, row] * h[b, col]``,
  from the inputs and output gradients the layer captured at the update step;
* ``grad_rows`` computes the dense gradient of one block of output rows, ``delta_block^T h``,
  which RigL-family growth scans block by block (regrow.core.row_blocks): never all rows;
* ``rewire`` merges the kept and grown keys (searchsorted + scatter, no sort of the whole
  layer) and re-indexes the values, their gradient and the optimizer's per-weight state the
  same way: kept entries keep theirs, grown entries start at zero state;
* the ITOP set (connections ever active) is a sorted int64 key set that grows by the number
  of newly explored connections per update (8 bytes each), not an out x in bitmap.

Capture: ``grad_at`` needs the update step's (h, delta); the target sets
``grad_needs_capture``, so the engine arms it before every update step of a method that reads
gradients (it references the h^T the layer saves for backward anyway and the delta^T it
computes in backward, until the step ends).
"""
from __future__ import annotations

import torch

from ..core import hugepages
from ..core.distributed import all_reduce_mean
from ..nn import _sparse_kernels
from ..nn.sparse_conv import captured_grad_rows, captured_tap_grads
from ..nn.sparse_linear import sampled_grad
from ..core.optim_state import OptimizerStateMasker
from ..core.sorted_keys import contains, merge_positions, union_sorted
from ..core.target import SparseTarget

#: ``mask`` (a dense bool tensor) is refused above this many entries
DENSE_MASK_LIMIT = 1 << 26
#: ``inactive_indices`` enumerates the grid only when it is at most this many times N
_ENUMERATE_FACTOR = 4


def _is_sorted(x: torch.Tensor) -> bool:
    return x.numel() < 2 or bool((x[1:] >= x[:-1]).all())


class _Plan:
    """How a rewire moves entries: ``old[src]`` goes to ``kept_dst``; grown entries fill ``new_dst``."""

    def __init__(self, src: torch.Tensor, kept_dst: torch.Tensor, new_dst: torch.Tensor):
        self.src, self.kept_dst, self.new_dst = src, kept_dst, new_dst
        self.size = kept_dst.numel() + new_dst.numel()

    def apply(self, old: torch.Tensor, new_values: torch.Tensor | None = None) -> torch.Tensor:
        """``old`` re-indexed; grown positions get ``new_values`` (zero when None)."""
        out = torch.empty(self.size, dtype=old.dtype, device=old.device)
        hugepages.advise(out)   # the re-indexed values and indices of a wide layer: 2 MiB pages
        if new_values is None:
            out.zero_()
        out[self.kept_dst] = old[self.src]
        if new_values is not None:
            out[self.new_dst] = new_values.to(old.dtype)
        return out


class IndexedTarget(SparseTarget):
    """The engine's view of one always-sparse layer (``regrow.nn._indexed.IndexedWeights``:
    values + sorted int32 row/col, a ``topology()`` with CSR ``crow`` and ``col``, and
    ``arm_capture`` / ``disarm_capture`` / ``captured``). Subclasses say how the gradient of
    asked connections (``grad_at``) and of a block of rows (``grad_rows``) are computed.

    The layer chose its initial topology and N itself (``preinitialised``), so the density
    the engine allocated is ignored: ``budget`` is the layer's N.
    """

    preinitialised = True
    grad_needs_capture = True

    def __init__(self, name: str, layer, optimizer_state: OptimizerStateMasker):
        self.name = name
        self.layer = layer
        self.rows, self.cols = layer.rows, layer.cols
        self.budget = layer.nnz
        self._optimizer_state = optimizer_state
        self._keys: torch.Tensor | None = None
        self._ever = layer.active_keys()

    # -- reading -------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.layer.nnz

    @property
    def device(self) -> torch.device:
        return self.layer.values.device

    @property
    def mask(self) -> torch.Tensor:
        if self.numel > DENSE_MASK_LIMIT:
            raise ValueError(f"'{self.name}' is an always-sparse {self.rows} x {self.cols} layer; a dense mask "
                             f"would need {self.numel / 2**30:.1f} GiB (use stats(), or the layer's "
                             "row_indices/col_indices)")
        m = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        m[self.active_indices()] = True
        return m.view(self.rows, self.cols)

    def active_indices(self) -> torch.Tensor:
        if self._keys is None:
            self._keys = self.layer.active_keys()
        return self._keys

    def active_values(self) -> torch.Tensor:
        return self.layer.values.detach()

    def is_active(self, flat: torch.Tensor) -> torch.Tensor:
        pos = self._locate(flat)
        if pos is not None:
            return (pos >= 0).view(flat.shape)
        keys = self.active_indices()
        if keys.numel() == 0:
            return torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
        if flat.numel() > 4096 and not _is_sorted(flat):
            # binary searches of sorted queries walk the keys in order: 4-10x faster than
            # random-order queries once the keys outgrow the cache (PERF-NOTES)
            sorted_flat, order = flat.sort()
            out = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
            out[order] = contains(keys, sorted_flat)
            return out
        return contains(keys, flat)

    def _locate(self, flat: torch.Tensor) -> torch.Tensor | None:
        """Storage positions of flat keys (-1 if inactive) by the compiled kernel, else None."""
        if self.device.type != "cpu" or (kernels := _sparse_kernels.load()) is None:
            return None
        # binary search inside each query's row segment: no sorting of queries, no key array
        topo = self.layer.topology()
        return kernels.locate(flat.reshape(-1).to(torch.long), self.cols, topo.crow, topo.col)

    def inactive_indices(self) -> torch.Tensor:
        # only for layers so dense that the grid is O(N) anyway (rejection sampling would crawl)
        if self.numel > _ENUMERATE_FACTOR * max(self.nnz, 1):
            return super().inactive_indices()
        mask = torch.ones(self.numel, dtype=torch.bool, device=self.device)
        mask[self.active_indices()] = False
        return mask.nonzero().squeeze(1)

    def _captured(self):
        captured = self.layer.captured()
        if captured is None:
            raise RuntimeError(f"no inputs/output gradients were captured for '{self.name}' at this step; "
                               "the engine arms the capture before an update step's forward")
        return captured

    def grad_available(self) -> bool:
        # the layer took no part in this step's forward/backward (an unused branch): the engine
        # skips its update, as the masked backend does for a parameter without a gradient
        return self.layer.captured() is not None

    def row_counts(self) -> torch.Tensor:
        return torch.bincount(self.layer.row_indices.long(), minlength=self.rows)

    def ever_active_count(self) -> int:
        return self._ever.numel()

    def fan_in_bound(self) -> float:
        return self.layer.init_bound()

    # -- per-step work -------------------------------------------------------------------
    def arm_capture(self) -> None:
        self.layer.arm_capture()

    def release(self) -> None:
        self.layer.disarm_capture()
        self._keys = None

    def grad_is_finite(self) -> bool:
        g = self.layer.values.grad
        return g is None or bool(torch.isfinite(g).all())

    # every stored value is active: nothing to mask (mask_grad / apply_mask stay no-ops)

    # -- changing the topology -----------------------------------------------------------
    @torch.no_grad()
    def rewire(self, drop: torch.Tensor, grow: torch.Tensor, grow_values: torch.Tensor) -> None:
        n = self.nnz
        drop = drop.to(device=self.device, dtype=torch.long)
        grow = grow.to(device=self.device, dtype=torch.long)
        if grow_values.numel() != grow.numel():
            raise ValueError(f"rewire of '{self.name}': {grow.numel()} grown connections but {grow_values.numel()} values")
        pos = self._locate(drop)
        if pos is None:
            keys = self.active_indices()
            pos = torch.searchsorted(keys, drop).clamp_(max=max(n - 1, 0))
            if n:
                pos[keys[pos] != drop] = -1
        if pos.numel() and (n == 0 or int(pos.min()) < 0):
            raise ValueError(f"rewire of '{self.name}': a dropped connection is not active")
        keep = torch.ones(n, dtype=torch.bool, device=self.device)
        keep[pos] = False
        if int(keep.sum()) != n - drop.numel():
            raise ValueError(f"rewire of '{self.name}': duplicate dropped connections")
        grow_values = grow_values.to(self.device)
        if not _is_sorted(grow):   # GSE and SET hand over sorted indices: no sort needed then
            grow, order = grow.sort()
            grow_values = grow_values[order]
        if grow.numel() and (bool(self.is_active(grow).any()) or bool((grow[1:] == grow[:-1]).any())
                             or int(grow[0]) < 0 or int(grow[-1]) >= self.numel):
            raise ValueError(f"rewire of '{self.name}': grown connections must be distinct, inactive and in range")

        src = keep.nonzero().squeeze(1)
        plan = _Plan(src, *merge_positions(self.active_indices()[src], grow))
        layer = self.layer
        param = layer.values
        old_n = param.numel()
        state = self._optimizer_state.optimizer.state.get(param, {})
        for name, buf in list(state.items()):
            if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
                new = plan.apply(buf)
                if new.numel() == old_n:
                    buf.copy_(new)
                else:
                    state[name] = new
        grad = param.grad
        new_grad = None if grad is None else plan.apply(grad)
        grow_row = torch.div(grow, self.cols, rounding_mode="floor")
        layer._assign(plan.apply(layer.row_indices, grow_row), plan.apply(layer.col_indices, grow - grow_row * self.cols),
                      plan.apply(param.detach(), grow_values))
        if new_grad is not None:
            if new_grad.shape == grad.shape:
                grad.copy_(new_grad)
            else:
                param.grad = new_grad
        self._keys = None
        self._ever = union_sorted(self._ever, grow)   # grow is sorted and distinct (checked above)

    def state_dict(self) -> dict:
        return {"ever_active": self._ever.clone()}

    def load_state_dict(self, state: dict) -> None:
        ever = state["ever_active"].to(device=self.device, dtype=torch.long)
        self._keys = None
        if ever.numel() and (int(ever.min()) < 0 or int(ever.max()) >= self.numel):
            raise ValueError(f"checkpoint ever-active set for '{self.name}' does not fit a "
                             f"{self.rows} x {self.cols} layer")
        # the saved set already holds every connection active at save time; the layer's
        # current topology may still be a fresh random one if the model is loaded afterwards
        self._ever = torch.unique(ever)


class SparseLinearTarget(IndexedTarget):
    """The engine's view of one :class:`regrow.nn.SparseLinear`: dL/dW = delta^T h from the
    update step's captured inputs h and output gradients delta."""

    def __init__(self, name: str, layer, optimizer_state: OptimizerStateMasker):
        super().__init__(name, layer, optimizer_state)
        self._grad_block: torch.Tensor | None = None   # grad_rows' reused output buffer

    def grad_at(self, flat: torch.Tensor) -> torch.Tensor:
        h_t, delta_t = self._captured()
        flat = flat.to(torch.long)
        r = torch.div(flat, self.cols, rounding_mode="floor").to(torch.int32)
        c = (flat % self.cols).to(torch.int32)
        # h and delta are this rank's shard of the batch: under DDP average over ranks, as DDP
        # does for p.grad, so that every rank scores (and grows) the same connections
        return all_reduce_mean(sampled_grad(self.rows, r, c, h_t, delta_t))

    def grad_rows(self, start: int, stop: int) -> torch.Tensor:
        # one block of dL/dW = delta^T h: [stop - start, B] x [B, cols], never all rows at once;
        # written into one buffer reused by the blocks of a scan (fresh blocks fragment the heap)
        h_t, delta_t = self._captured()
        n = (stop - start) * self.cols
        if self._grad_block is None or self._grad_block.numel() < n or self._grad_block.dtype != h_t.dtype:
            self._grad_block = torch.empty(n, dtype=h_t.dtype, device=h_t.device)
        out = self._grad_block[:n].view(stop - start, self.cols)
        return all_reduce_mean(torch.mm(delta_t[start:stop], h_t.t(), out=out))

    def activations(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        pair = self.layer.captured()
        return None if pair is None else (pair[0].t(), pair[1].t())

    def release(self) -> None:
        super().release()
        self._grad_block = None


class SparseConv2dTarget(IndexedTarget):
    """The engine's view of one :class:`regrow.nn.SparseConv2d`: rows are output channels,
    columns the ``in * kh * kw`` taps (the masked backend's view of an nn.Conv2d kernel).

    dL/dw of asked taps is sampled per kernel offset from the captured inputs and output
    gradients (``captured_tap_grads``); a block of output channels' dense gradient is a
    weight-gradient convolution of those channels only (``captured_grad_rows``). Like the
    masked backend for nn.Conv2d, it offers no ``activations()`` (a conv's factorised gradient
    would be its whole im2col): GSE's grabo/graest then draw from the row and column sums of
    |dL/dW|, read block by block (``regrow.core.sampling``).
    """

    def grad_at(self, flat: torch.Tensor) -> torch.Tensor:
        self._captured()   # a clear error when nothing was captured
        flat = flat.to(torch.long)
        row = torch.div(flat, self.cols, rounding_mode="floor")
        # this rank's shard of the batch: averaged over ranks as DDP averages p.grad
        return all_reduce_mean(captured_tap_grads(self.layer, row, flat - row * self.cols).view(flat.shape))

    def grad_rows(self, start: int, stop: int) -> torch.Tensor:
        self._captured()
        return all_reduce_mean(captured_grad_rows(self.layer, start, stop))
