"""Export a sparse-trained model for inference, and save/load exports without pickle.

``export(model, dst_or_masks, format)`` returns a deep copy in eval mode with the masks baked in:

- ``"dense"``: the same modules, masked weights zeroed.
- ``"csr"``: every masked ``nn.Linear`` becomes a ``regrow.nn.CSRLinear``; other layers dense.
- ``"condensed"`` (SRigL): ablated neurons (all-False mask rows) are removed, together with the
  matching inputs of the layer that consumes them, wherever the traced graph (torch.fx) proves
  the path between the two is a chain of per-feature operations (activations, dropout,
  batch norm, pooling, flatten); an ablated neuron still outputs ``act(bias)``, and that
  constant is folded into the consumer's bias before its columns go. Then each masked
  ``nn.Linear`` with constant fan-in over its active rows becomes a ``CondensedLinear``
  (rows that lost inputs to an upstream removal are zero-padded), one with varying fan-in
  becomes ``CSRLinear`` if its density is at most ``csr_max_density`` and stays dense
  otherwise; a masked layer without zeros (density 1) stays a plain ``nn.Linear``. An always-sparse
  ``SparseLinear`` takes part in the removal and is converted the same way, all from its values
  and indices (nothing of size out x in); ``SparseConv2d`` becomes ``nn.Conv2d`` + mask first.
  Convolutions stay dense with masks applied: a condensed convolution measured
  slower than torch's dense one here (see ``benchmarks/inference.py``), but their ablated
  output channels are removed where the graph allows.

``nn.TransformerEncoderLayer``'s ``linear1`` / ``linear2`` stay ``nn.Linear`` (dense, mask applied)
in every format: in eval mode the layer's fused fast path reads their ``.weight`` directly
instead of calling them, so a replaced layer would break it; the report says so.

Where a removal cannot be proven safe (untraceable forward, a neuron feeding a residual sum or
two consumers, a nonzero constant entering a zero-padded convolution), the layer keeps its
width and the report says why. The returned module carries ``regrow_export_report``: one dict
per layer with keys ``name``, ``kind``, ``format``, ``shape``, ``nnz``, ``params``, ``bytes``,
``notes``; ``format_report`` renders it as a table.

Saving and loading without pickle: :mod:`regrow.export.serialize`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import fx, nn

from ..nn.condensed import CondensedLinear, CSRLinear, has_constant_fan_in
from ._kinds import (BATCHNORMS, CONSTANT_PRESERVING_POOLS, CONVS, ELEMENTWISE_FUNCTIONS,
                     ELEMENTWISE_METHODS, ELEMENTWISE_MODULES)

FORMATS = ("condensed", "csr", "dense")
# parents whose forward reads these children's .weight itself (torch's fused fast path) instead
# of calling them: the children must stay nn.Linear with their full weight
_WEIGHT_READERS = {nn.TransformerEncoderLayer: ("linear1", "linear2")}


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def export(model: nn.Module, dst_or_masks: Any, format: str = "condensed", *,
           csr_max_density: float = 0.1) -> nn.Module:
    """A plain inference copy of ``model`` with its masks baked in (see the module docstring).

    Args:
        model: the trained model (left untouched).
        dst_or_masks: a ``regrow.DynamicSparsity`` (its ``masks`` are used) or a dict mapping
            parameter names (as in ``model.named_parameters()``) to bool masks of their shapes.
        format: ``"condensed"``, ``"csr"`` or ``"dense"``.
        csr_max_density: in condensed mode, a masked linear layer without constant fan-in becomes
            CSR at or below this density, and stays dense above it.

    Returns:
        A deep copy in eval mode, with ``regrow_export_report`` (list of per-layer dicts).

    Raises:
        ValueError: unknown format, or masks that do not match the model's parameters.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if not 0.0 <= csr_max_density <= 1.0:
        raise ValueError(f"csr_max_density must be in [0, 1], got {csr_max_density}")
    masks = _resolve_masks(model, dst_or_masks)
    out = copy.deepcopy(model)
    _strip_training_state(out)
    out.eval()
    order = {n: i for i, (n, _) in enumerate(out.named_modules())}
    out, direct = _convert_sparse_layers(out, masks, format, csr_max_density)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].device))
    state = _ExportState(out, {n: m.to(params[n].device) for n, m in masks.items()})
    if format == "condensed":
        state.remove_ablated()
    out = state.convert(format, csr_max_density)
    report = state.report(out)
    if direct:  # in the model's module order; rows naming parameters (not modules) stay last
        report = sorted(report + list(direct.values()),
                        key=lambda r: order.get("" if r["name"] == "(root)" else r["name"], len(order)))
    out.regrow_export_report = report
    return out


def _resolve_masks(model: nn.Module, dst_or_masks: Any) -> dict[str, torch.Tensor]:
    masks = getattr(dst_or_masks, "masks", dst_or_masks)
    if not isinstance(masks, Mapping):
        raise ValueError(f"expected a DynamicSparsity or a dict of masks, got {type(dst_or_masks).__name__}")
    params = dict(model.named_parameters())
    # always-sparse layers carry their own topology; masks given for them are not needed
    own_topology = {f"{n}.{m.regrow_sparse_parameter}" if n else m.regrow_sparse_parameter
                    for n, m in model.named_modules() if _is_sparse_layer(m)}
    resolved = {}
    for name, mask in masks.items():
        if name in own_topology:
            continue
        if name not in params:
            raise ValueError(f"mask '{name}' names no parameter of the model")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(params[name].shape):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask '{name}' has shape {shape}, parameter has {tuple(params[name].shape)}")
        resolved[name] = mask.detach().to(torch.bool)
    return resolved


def _strip_training_state(model: nn.Module) -> None:
    """Drop gradients, parametrizations and regrow's own hooks (activation capture) from a copy."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module):
            for pname in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
        for hooks_name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(module, hooks_name, {})
            for key, fn in list(hooks.items()):
                owner = getattr(fn, "__self__", None)
                if owner is not None and type(owner).__module__.startswith("regrow."):
                    del hooks[key]
                    for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(module, extra, {}).pop(key, None)
    for p in model.parameters():
        p.grad = None


def _is_sparse_layer(m: nn.Module) -> bool:
    return hasattr(m, "regrow_sparse_parameter") and hasattr(m, "active_keys") and hasattr(m, "to_dense")


def _is_sparse_linear(m: nn.Module) -> bool:
    """An always-sparse linear layer: ``values`` at ``row_indices`` / ``col_indices`` of a
    ``rows x cols`` weight, and ``bias`` (``regrow.nn.SparseLinear``, or one duck-typed like it)."""
    return _is_sparse_layer(m) and not hasattr(m, "to_conv2d")


def _convert_sparse_layers(model: nn.Module, masks: dict[str, torch.Tensor], format: str,
                           csr_max_density: float) -> tuple[nn.Module, dict[str, dict]]:
    """Convert the always-sparse layers (duck-typed: ``regrow_sparse_parameter``, ``active_keys``,
    ``to_dense``) that ``_ExportState`` does not take as they are; returns the model and the
    report rows of the layers converted directly.

    - sparse linear layers (``values`` + ``row_indices`` / ``col_indices``): ``csr`` makes them
      ``CSRLinear`` straight from their indices (:func:`_direct`); ``condensed`` leaves them to
      ``_ExportState``, which removes ablated neurons on the indices and then calls
      :func:`_direct`; ``dense`` makes them nn.Linear + mask.
    - layers with ``to_conv2d`` (``regrow.nn.SparseConv2d``) become nn.Conv2d + mask in every
      format (its dense kernel built once): removal on a sparse convolution's indices is not
      written, and condensed convolutions stay dense anyway.
    """
    sparse = [(n, m) for n, m in model.named_modules() if _is_sparse_layer(m)]
    direct: dict[str, dict] = {}
    for name, m in sparse:
        if _is_sparse_linear(m) and format == "condensed":
            continue
        if _is_sparse_linear(m) and format == "csr":
            new, direct[name] = _direct(name, type(m).__name__, _Entries.of(m), format, csr_max_density)
            if not name:
                return new, direct
            model.set_submodule(name, new)
            continue
        weight = m.to_dense().detach()
        bias = getattr(m, "bias", None)
        if hasattr(m, "to_conv2d"):
            dense_layer = m.to_conv2d()
        else:
            dense_layer = nn.Linear(m.in_features, m.out_features, bias=bias is not None,
                                    device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                dense_layer.weight.copy_(weight)
                if bias is not None:
                    dense_layer.bias.copy_(bias.detach())
        mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
        mask[m.active_keys().to(weight.device)] = True
        masks[f"{name}.weight" if name else "weight"] = mask.view_as(weight)
        if not name:
            return dense_layer, direct
        model.set_submodule(name, dense_layer)
    return model, direct


@dataclass
class _Entries:
    """A sparse linear layer's weight as its active entries (int64 ``row``, ``col``, sorted by
    (row, col)), its ``shape`` and ``bias``: what the condensed export's neuron removal edits in
    place of a dense weight and mask, in O(nnz + rows + cols)."""

    row: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]
    bias: torch.Tensor | None
    #: judged on the trained layer, before upstream removals took inputs (as for masked layers)
    constant_fan_in: bool

    @classmethod
    def of(cls, m: nn.Module) -> "_Entries":
        row = m.row_indices.long()
        counts = torch.bincount(row, minlength=m.rows)
        active = counts[counts > 0]
        return cls(row, m.col_indices.long(), m.values.detach(), (m.rows, m.cols),
                   None if m.bias is None else m.bias.detach(),
                   active.numel() == 0 or bool((active == active[0]).all()))

    def dead_rows(self) -> torch.Tensor:
        """Rows without entries (ablated neurons)."""
        return torch.bincount(self.row, minlength=self.shape[0]) == 0

    def drop_rows(self, keep: torch.Tensor) -> None:
        """Keep the rows ``keep`` marks; the others must be dead (they hold no entry)."""
        self.row = (torch.cumsum(keep, 0) - 1)[self.row]   # renumbered; order stays (row, col)
        if self.bias is not None:
            self.bias = self.bias[keep]
        self.shape = (int(keep.sum()), self.shape[1])

    def drop_inputs(self, gone: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """Remove the input columns ``gone`` marks, whose inputs are the constants ``const``
        [cols]; returns their contribution to each row, ``sum(values * const[col])``."""
        out = gone[self.col]
        fold = torch.zeros(self.shape[0], dtype=self.values.dtype, device=self.values.device)
        fold.index_add_(0, self.row[out], self.values[out] * const[self.col[out]].to(self.values.dtype))
        stay = ~out
        self.row, self.values = self.row[stay], self.values[stay]
        self.col = (torch.cumsum(~gone, 0) - 1)[self.col[stay]]
        self.shape = (self.shape[0], int((~gone).sum()))
        return fold

    def add_to_bias(self, fold: torch.Tensor) -> None:
        if self.bias is None and bool((fold != 0).any()):
            self.bias = torch.zeros_like(fold)
        if self.bias is not None:
            self.bias = self.bias + fold

    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` (out x in: only where the export keeps the layer dense)."""
        layer = nn.Linear(self.shape[1], self.shape[0], bias=self.bias is not None,
                          device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            layer.weight.zero_()
            layer.weight[self.row, self.col] = self.values
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


def _direct(name: str, kind: str, e: _Entries, format: str, csr_max_density: float,
            notes: Iterable[str] = ()) -> tuple[nn.Module, dict]:
    """The sparse linear layer ``e`` as CondensedLinear (condensed format, constant fan-in over
    its non-empty rows before any upstream removal; rows that lost inputs are zero-padded) or
    CSRLinear (csr format; condensed format at density <= ``csr_max_density``) read from its
    indices, with its report row (``notes`` first: what the removal did). The condensed format
    keeps it a dense nn.Linear where a masked layer would stay dense too (density 1, or varying
    fan-in above ``csr_max_density``: the dense weight is then at most 1 / csr_max_density times
    the stored values)."""
    shape, nnz = e.shape, e.values.numel()
    density = nnz / (shape[0] * shape[1])
    notes, fmt = list(notes), "condensed"
    if format == "condensed" and density == 1.0:
        new, fmt = e.to_linear(), "dense"
        notes += ["no zeros (density 1): dense", "dense weight built from the layer's indices"]
    elif format == "condensed" and e.constant_fan_in:
        new = CondensedLinear.from_indices(e.row, e.col, e.values, shape, e.bias, pad=True)
        notes.append("read from the layer's indices (no dense weight)")
        if new.rows * new.fan_in > nnz:
            notes.append(f"{new.rows * new.fan_in - nnz} padding slots (rows that lost inputs to an upstream removal)")
        if new.row_index is not None:
            notes.append(f"{new.out_features - new.rows} ablated outputs kept (output = bias)")
    elif format == "csr" or density <= csr_max_density:
        new, fmt = CSRLinear.from_indices(e.row, e.col, e.values, shape, e.bias), "csr"
        notes.append("read from the layer's indices (no dense weight)")
        if format == "condensed":
            notes.append(f"fan-in not constant: csr (density {density:.3f} <= {csr_max_density})")
    else:
        new, fmt = e.to_linear(), "dense"
        notes += [f"fan-in not constant and density {density:.3f} > {csr_max_density}: dense",
                  "dense weight built from the layer's indices"]
    tensors = list(new.parameters(recurse=False)) + list(new.buffers(recurse=False))
    return new, {"name": name or "(root)", "kind": kind, "format": fmt, "shape": list(shape), "nnz": nnz,
                 "params": int(sum(p.numel() for p in new.parameters(recurse=False))),
                 "bytes": int(sum(t.numel() * t.element_size() for t in tensors)), "notes": "; ".join(notes)}


def _is_plain_linear(m: nn.Module) -> bool:
    # subclasses that override forward (or MultiheadAttention's out_proj, read by its parent
    # without calling it) must keep their class
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _is_plain_conv(m: nn.Module) -> bool:
    return isinstance(m, CONVS) and type(m).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


@dataclass
class _Chain:
    """producer -> per-feature ops -> consumer, proven by the traced graph."""

    producer: str
    ops: list[fx.Node]
    consumer: str
    group: int = 1           # consumer inputs per producer feature (conv -> flatten -> linear)
    padded: bool = False     # consumer is a zero-padded conv: only zero constants can be folded


@dataclass
class _LayerNote:
    notes: list[str] = field(default_factory=list)
    format: str = "dense"


class _ExportState:
    """The copy being exported, its current masks, and what happened to each layer.

    Masked layers (nn.Linear, convolutions) are edited through their weights and masks; sparse
    linear layers (``SparseLinear``, left in the model by ``_convert_sparse_layers`` in the
    condensed format) through their entries (``self.entries``), never a dense weight, and
    ``convert`` turns them into their export layer with :func:`_direct`."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.masks = masks
        self.original_masks = dict(masks)  # removals replace entries of self.masks, never these
        self.modules = dict(model.named_modules())
        self.layer: dict[str, _LayerNote] = {}
        self.replaced: dict[str, nn.Module] = {}
        self.entries = {n: _Entries.of(m) for n, m in self.modules.items() if _is_sparse_linear(m)}
        self.direct_rows: dict[str, dict] = {}   # report rows of the sparse layers, from _direct
        parents = {f"{name}.{child}" if name else child: m for name, m in self.modules.items()
                   for child, _ in m.named_children()}
        self.layers = [n for n, m in self.modules.items() if n in self.entries or (
            (_is_plain_linear(m) or _is_plain_conv(m)) and not isinstance(parents.get(n), nn.MultiheadAttention))]
        for n in self.layers:
            self.layer[n] = _LayerNote()
        #: layers whose parent reads their weight directly: kept as they are, with the reason
        self.pinned = {n: f"kept dense with mask applied: {type(parents[n]).__name__} reads its .weight "
                          "directly (fused fast path)"
                       for n in self.layers if n in parents and n not in self.entries and n.rsplit(".", 1)[-1] in
                       next((kids for kind, kids in _WEIGHT_READERS.items() if isinstance(parents[n], kind)), ())}

    def mask_of(self, name: str) -> torch.Tensor | None:
        return self.masks.get(f"{name}.weight" if name else "weight")

    def dead_outputs(self, name: str) -> torch.Tensor | None:
        """Which outputs of layer ``name`` have no active weight (None: an unmasked dense layer)."""
        if name in self.entries:
            return self.entries[name].dead_rows()
        mask = self.mask_of(name)
        return None if mask is None else ~mask.reshape(mask.shape[0], -1).any(1)

    def note(self, name: str, text: str) -> None:
        self.layer.setdefault(name, _LayerNote()).notes.append(text)

    # -- neuron removal ------------------------------------------------------------------
    def remove_ablated(self) -> None:
        ablated = {}
        for name in self.layers:
            if name in self.pinned or not name:   # a root layer's outputs are the model's outputs
                continue
            dead = self.dead_outputs(name)
            if dead is not None and bool(dead.any()):
                ablated[name] = dead
        if not ablated:
            return
        try:
            graph = _LeafTracer().trace(self.model)
        except Exception as exc:  # any tracing failure means: no proof, keep widths
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            for name, dead in ablated.items():
                self.note(name, f"{int(dead.sum())} ablated neurons kept in place (forward not traceable by "
                                f"torch.fx: {reason})")
            return
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:  # graph order: a producer's bias is final before its own removal
            if node.op != "call_module" or node.target not in ablated:
                continue
            name = node.target
            chain = self._find_chain(node, calls)
            if isinstance(chain, str):
                self.note(name, f"{int(ablated[name].sum())} ablated neurons kept in place ({chain})")
                continue
            self._remove(chain, ablated[name])

    def _find_chain(self, node: fx.Node, calls: dict[str, int]) -> _Chain | str:
        name = node.target
        producer = self.modules[name]
        if calls.get(name, 0) != 1:
            return "the layer is called more than once"
        is_conv = isinstance(producer, CONVS)
        ops: list[fx.Node] = []
        flattened = False
        cur = node
        while True:
            if len(cur.users) != 1:
                return "its output has several consumers" if cur.users else "its output is unused"
            nxt = next(iter(cur.users))
            if not _only_input(nxt, cur):
                return f"its output meets other tensors at '{nxt.name}' (e.g. a residual sum)"
            if nxt.op == "call_module":
                mod = self.modules[nxt.target]
                if ((_is_plain_linear(mod) or nxt.target in self.entries) and (not is_conv or flattened)) or (
                        is_conv and not flattened and _is_plain_conv(mod) and type(mod) is type(producer)):
                    break
                if calls.get(nxt.target, 0) != 1 and not isinstance(mod, ELEMENTWISE_MODULES):
                    return f"'{nxt.target}' is called more than once"
                ok = self._op_ok(mod, is_conv, flattened)
                if ok is None:
                    return f"'{nxt.target}' ({type(mod).__name__}) is not a per-feature operation"
                flattened = flattened or ok == "flatten"
            elif nxt.op == "call_function" and nxt.target in ELEMENTWISE_FUNCTIONS:
                pass
            elif nxt.op == "call_function" and nxt.target is torch.flatten and _flatten_from_1(nxt):
                flattened = True
            elif nxt.op == "call_method" and nxt.target in ELEMENTWISE_METHODS:
                pass
            elif nxt.op == "output":
                return "it is the model's output"
            else:
                return f"its output reaches '{nxt.name}' ({nxt.op} {getattr(nxt.target, '__name__', nxt.target)})"
            ops.append(nxt)
            cur = nxt
        consumer_name = nxt.target
        consumer = self.modules[consumer_name]
        if consumer_name in self.pinned:
            return f"its consumer '{consumer_name}' is read directly by its parent"
        if calls.get(consumer_name, 0) != 1:
            return f"its consumer '{consumer_name}' is called more than once"
        features = producer.out_channels if is_conv else producer.out_features
        if not isinstance(consumer, CONVS):   # nn.Linear or a sparse linear layer
            if consumer.in_features % features:
                return f"consumer '{consumer_name}' has {consumer.in_features} inputs for {features} features"
            group = consumer.in_features // features
            if group != 1 and not (is_conv and flattened):
                return f"consumer '{consumer_name}' input size does not match"
            return _Chain(name, ops, consumer_name, group=group)
        if consumer.groups != 1 or consumer.in_channels != features:
            return f"consumer '{consumer_name}' is grouped or has another channel count"
        padded = consumer.padding == "same" or any(p != 0 for p in consumer.padding)
        return _Chain(name, ops, consumer_name, padded=padded)

    def _op_ok(self, mod: nn.Module, is_conv: bool, flattened: bool) -> str | None:
        if isinstance(mod, ELEMENTWISE_MODULES):
            return "elementwise"
        if isinstance(mod, BATCHNORMS) and not flattened:
            # eval-mode batch norm with running statistics is a per-feature affine map
            return "batchnorm" if mod.track_running_stats and mod.running_mean is not None else None
        if is_conv and not flattened:
            if isinstance(mod, CONSTANT_PRESERVING_POOLS):
                return "pool"
            if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
                pad = mod.padding if isinstance(mod.padding, tuple) else (mod.padding,)
                return "pool" if all(p == 0 for p in pad) or not mod.count_include_pad else None
        if isinstance(mod, nn.Flatten):
            if mod.end_dim == -1 and mod.start_dim == 1:
                return "flatten"
        return None

    def _constants(self, chain: _Chain) -> torch.Tensor:
        """What each producer feature outputs after the chain when its weights are all zero."""
        producer = self.modules[chain.producer]
        if chain.producer in self.entries:   # its bias as folded so far, from earlier removals
            e = self.entries[chain.producer]
            n, spatial, bias, like = e.shape[0], 0, e.bias, e.values
        else:
            n, spatial, bias, like = producer.weight.shape[0], producer.weight.dim() - 2, producer.bias, producer.weight
        t = bias.detach().clone() if bias is not None else like.new_zeros(n)
        t = t.reshape(1, n, *([1] * spatial))
        with torch.no_grad():
            for op in chain.ops:  # pools and flattens leave a per-feature constant unchanged
                if op.op == "call_module":
                    mod = self.modules[op.target]
                    if isinstance(mod, ELEMENTWISE_MODULES + BATCHNORMS):
                        t = mod(t)
                elif op.op == "call_function" and op.target is not torch.flatten:
                    t = op.target(t, *op.args[1:], **op.kwargs)  # _only_input: args[0] is the chain
                elif op.op == "call_method":
                    t = getattr(t, op.target)(*op.args[1:], **op.kwargs)
        return t.reshape(-1)

    def _remove(self, chain: _Chain, dead: torch.Tensor) -> None:
        producer = self.modules[chain.producer]
        dtype = self.entries[chain.producer].values.dtype if chain.producer in self.entries else producer.weight.dtype
        const = self._constants(chain).to(dtype)
        removable = dead.clone()
        if chain.padded:
            removable &= const == 0
        if bool(removable.all()):
            removable[0] = False  # keep one (constant) feature rather than build zero-width layers
        n_dead, n_rm = int(dead.sum()), int(removable.sum())
        if n_rm == 0:
            self.note(chain.producer, f"{n_dead} ablated channels kept in place (nonzero constant output "
                                      f"into zero-padded '{chain.consumer}')")
            return
        keep = ~removable
        with torch.no_grad():
            self._drop_inputs(chain, removable, const)
            self._drop_outputs(chain.producer, keep)
            for op in chain.ops:  # batch norms on the way lose the producer's removed entries
                if op.op == "call_module" and isinstance(self.modules[op.target], BATCHNORMS):
                    _slice_batchnorm(self.modules[op.target], keep)
                    self.note(op.target, f"{n_rm} entries removed with '{chain.producer}'")
        msg = f"removed {n_rm} ablated neurons and the matching inputs of '{chain.consumer}'"
        if n_rm < n_dead:
            msg += f"; {n_dead - n_rm} kept (nonzero constant output into zero-padded '{chain.consumer}')"
        self.note(chain.producer, msg)
        self.note(chain.consumer, f"{n_rm * chain.group} inputs removed (ablated in '{chain.producer}'); "
                                  "their constant contribution folded into the bias")

    def _drop_inputs(self, chain: _Chain, removable: torch.Tensor, const: torch.Tensor) -> None:
        """The consumer loses the inputs of the ``removable`` producer features; their constant
        contribution (``const`` per feature) is folded into its bias."""
        name, consumer = chain.consumer, self.modules[chain.consumer]
        if name in self.entries:
            e = self.entries[name]
            e.add_to_bias(e.drop_inputs(removable.repeat_interleave(chain.group),
                                        const.repeat_interleave(chain.group)))
            return
        w = consumer.weight
        if isinstance(consumer, nn.Linear):
            w3 = w.reshape(w.shape[0], -1, chain.group)
            fold = (w3[:, removable, :] * const[removable].view(1, -1, 1)).sum((1, 2))
            cols = (~removable).repeat_interleave(chain.group)
        else:
            fold = (w[:, removable] * const[removable].view(1, -1, *([1] * (w.dim() - 2)))).sum(
                tuple(range(1, w.dim())))
            cols = ~removable
        new_w = w[:, cols]
        if consumer.bias is None and bool((fold != 0).any()):
            consumer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                         requires_grad=w.requires_grad)
        if consumer.bias is not None:
            consumer.bias.add_(fold)
        consumer.weight = nn.Parameter(new_w.contiguous(), requires_grad=w.requires_grad)
        if isinstance(consumer, nn.Linear):
            consumer.in_features = new_w.shape[1]
        else:
            consumer.in_channels = new_w.shape[1]
        cmask = self.mask_of(name)
        if cmask is not None:
            self.masks[f"{name}.weight"] = cmask[:, cols].contiguous()

    def _drop_outputs(self, name: str, keep: torch.Tensor) -> None:
        """The producer keeps only the outputs ``keep`` marks (the others are ablated)."""
        if name in self.entries:
            self.entries[name].drop_rows(keep)
            return
        producer = self.modules[name]
        producer.weight = nn.Parameter(producer.weight[keep].contiguous(), requires_grad=producer.weight.requires_grad)
        if producer.bias is not None:
            producer.bias = nn.Parameter(producer.bias[keep].contiguous(), requires_grad=producer.bias.requires_grad)
        if isinstance(producer, nn.Linear):
            producer.out_features = int(keep.sum())
        else:
            producer.out_channels = int(keep.sum())
        self.masks[f"{name}.weight"] = self.mask_of(name)[keep].contiguous()

    # -- format conversion ---------------------------------------------------------------
    def convert(self, format: str, csr_max_density: float) -> nn.Module:
        root = self.model
        for name in self.layers:
            module = self.modules[name]
            mask = self.mask_of(name)
            rec = self.layer[name]
            if name in self.entries:
                module, self.direct_rows[name] = _direct(name, type(module).__name__, self.entries[name], format,
                                                         csr_max_density, rec.notes)
                if name == "":
                    root = module
                else:
                    self.model.set_submodule(name, module)
                self.replaced[name] = module
                continue
            if mask is None:
                rec.notes.append("no mask (dense layer)")
                continue
            if name in self.pinned:
                rec.notes.append(self.pinned[name])
                continue
            if isinstance(module, CONVS):
                if format == "csr":
                    rec.notes.append("conv: dense with mask applied (csr covers linear layers)")
                elif format == "condensed":
                    rec.notes.append("conv: dense with mask applied (condensed conv measured slower)")
                continue
            if format == "dense":
                rec.notes.append("mask applied")
                continue
            # exact (a float32 mean puts a density of exactly 0.1 above 0.1)
            density = int(mask.sum()) / mask.numel() if mask.numel() else 1.0
            if format == "condensed" and density == 1.0:
                rec.notes.append("no zeros (density 1): dense")
                continue
            # constant fan-in is judged on the trained mask, before upstream removals took columns
            original = self.original_masks[f"{name}.weight" if name else "weight"]
            if format == "condensed" and has_constant_fan_in(original):
                new = CondensedLinear.from_dense(module.weight, mask, module.bias)
                rec.format = "condensed"
                padded = int(new.rows * new.fan_in - mask.sum())
                if padded:
                    rec.notes.append(f"{padded} padding slots (rows that lost inputs to an upstream removal)")
                if new.row_index is not None:
                    rec.notes.append(f"{new.out_features - new.rows} ablated outputs kept (output = bias)")
            elif format == "csr" or density <= csr_max_density:
                new = CSRLinear.from_dense(module.weight, mask, module.bias)
                rec.format = "csr"
                if format == "condensed":
                    rec.notes.append(f"fan-in not constant: csr (density {density:.3f} <= {csr_max_density})")
            else:
                rec.notes.append(f"fan-in not constant and density {density:.3f} > {csr_max_density}: dense")
                continue
            if name == "":
                root = new
            else:
                self.model.set_submodule(name, new)
            self.replaced[name] = new
        return root

    def report(self, root: nn.Module) -> list[dict]:
        rows = []
        modules = dict(root.named_modules())
        for name in self.layers:
            if name in self.direct_rows:
                rows.append(self.direct_rows[name])
                continue
            module = modules.get(name) if name else root
            mask = self.mask_of(name)
            rec = self.layer[name]
            tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            params = sum(p.numel() for p in module.parameters(recurse=False))
            if isinstance(module, CondensedLinear):
                shape = [module.out_features, module.in_features]
            elif isinstance(module, CSRLinear):
                shape = [module.out_features, module.in_features]
            else:
                shape = list(module.weight.shape)
            nnz = int(mask.sum()) if mask is not None else int(torch.count_nonzero(module.weight))
            rows.append({
                "name": name or "(root)", "kind": type(self.modules[name]).__name__, "format": rec.format,
                "shape": shape, "nnz": nnz, "params": int(params),
                "bytes": int(sum(t.numel() * t.element_size() for t in tensors)),
                "notes": "; ".join(rec.notes),
            })
        for name, rec in self.layer.items():
            if name not in self.layers:  # batch norms touched by removals
                rows.append({"name": name, "kind": type(self.modules[name]).__name__, "format": "dense",
                             "shape": [], "nnz": 0,
                             "params": int(sum(p.numel() for p in self.modules[name].parameters(recurse=False))),
                             "bytes": int(sum(t.numel() * t.element_size()
                                              for t in [*self.modules[name].parameters(recurse=False),
                                                        *self.modules[name].buffers(recurse=False)])),
                             "notes": "; ".join(rec.notes)})
        masked_elsewhere = [n for n in self.masks if n.rsplit(".", 1)[0] not in self.layers
                            and not (n == "weight" and "" in self.layers)]
        for pname in masked_elsewhere:
            mask = self.masks[pname]
            rows.append({"name": pname, "kind": "parameter", "format": "dense", "shape": list(mask.shape),
                         "nnz": int(mask.sum()), "params": mask.numel(), "bytes": mask.numel() * 4,
                         "notes": "mask applied to the dense parameter"})
        return rows


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, with sparse linear layers (SparseLinear, and CondensedLinear /
    CSRLinear: their forwards branch on shapes) kept as opaque calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, (CondensedLinear, CSRLinear)) or _is_sparse_linear(m)
                or super().is_leaf_module(m, module_qualified_name))


def _only_input(node: fx.Node, source: fx.Node) -> bool:
    """``node`` takes ``source`` as its first argument and no other graph value."""
    if not node.args or node.args[0] is not source:
        return False
    others = list(node.args[1:]) + list(node.kwargs.values())
    found: list[fx.Node] = []
    fx.node.map_arg(others, lambda a: found.append(a))
    return not found


def _flatten_from_1(node: fx.Node) -> bool:
    args = list(node.args[1:])
    start = args[0] if args else node.kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _slice_batchnorm(bn: nn.Module, keep: torch.Tensor) -> None:
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight = nn.Parameter(bn.weight[keep].contiguous(), requires_grad=bn.weight.requires_grad)
            bn.bias = nn.Parameter(bn.bias[keep].contiguous(), requires_grad=bn.bias.requires_grad)
        bn.running_mean = bn.running_mean[keep].contiguous()
        bn.running_var = bn.running_var[keep].contiguous()
    bn.num_features = int(keep.sum())


def format_report(report: Iterable[dict]) -> str:
    """The export report as a fixed-width table (one row per layer)."""
    rows = list(report)
    head = ["layer", "kind", "format", "shape", "nnz", "params", "bytes", "notes"]
    body = [[r["name"], r["kind"], r["format"], "x".join(map(str, r["shape"])) or "-", str(r["nnz"]),
             str(r["params"]), str(r["bytes"]), r["notes"]] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    widths[-1] = 0
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths[:-1]] + ["-----"])] + [fmt(b) for b in body])


