"""Build always-sparse networks: convert a model's nn.Linear layers, or build a wide MLP directly."""
from __future__ import annotations

from typing import Iterable, Sequence

from torch import nn

from ..core.density import DISTRIBUTIONS, allocate_counts
from .sparse_linear import SparseLinear


def _linear_layers(model: nn.Module, dense_layers: set[str]) -> list[tuple[str, nn.Linear]]:
    """nn.Linear modules to convert, skipping attention's out_proj (read as a raw weight)."""
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in inside_attention and name not in dense_layers]


def sparsify(model: nn.Module, sparsity: float | None = None, *, fan_in: int | None = None,
             distribution: str = "erk", seed: int = 0, dense_layers: Iterable[str] = ()) -> nn.Module:
    """Replace ``model``'s nn.Linear layers with :class:`SparseLinear` (in place; returns ``model``).

    Exactly one of:

    * ``sparsity``: overall fraction of zero weights over the converted layers; the per-layer
      non-zero counts come from :func:`regrow.density.allocate_counts` with ``distribution``
      (uniform, er, erk), exactly as the masked backend allocates them;
    * ``fan_in``: every output neuron gets ``min(fan_in, in_features)`` inputs, so N grows
      linearly with width.

    Each new layer gets a fresh constant fan-in topology (seed ``seed + i`` for the i-th layer)
    and fresh values (see SparseLinear); nothing of the dense weights is copied. Layers named in
    ``dense_layers`` (module names) and nn.MultiheadAttention's out_proj stay nn.Linear.

    The layers then keep their N under :class:`regrow.DynamicSparsity`: its ``sparsity`` and
    ``distribution`` arguments apply only to the layers left in the masked backend.
    """
    if (sparsity is None) == (fan_in is None):
        raise ValueError("give exactly one of sparsity or fan_in")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
                                 or not 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if fan_in is not None and (isinstance(fan_in, bool) or not isinstance(fan_in, int) or fan_in < 1):
        raise ValueError(f"fan_in must be a positive integer, got {fan_in!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution '{distribution}'; choose one of {', '.join(DISTRIBUTIONS)}")
    dense = set(dense_layers)
    known = {name for name, _ in model.named_modules()}
    unknown = sorted(dense - known)
    if unknown:
        raise ValueError(f"dense_layers names unknown module(s) {unknown}; see model.named_modules()")
    layers = _linear_layers(model, dense)
    if not layers:
        raise ValueError("the model has no nn.Linear layer to sparsify")
    if sparsity is not None:
        shapes = {name: (m.out_features, m.in_features) for name, m in layers}
        counts = allocate_counts(shapes, 1.0 - sparsity, distribution)
    for i, (name, linear) in enumerate(layers):
        kwargs = {"bias": linear.bias is not None, "seed": seed + i,
                  "device": linear.weight.device, "dtype": linear.weight.dtype}
        if sparsity is not None:
            numel = linear.out_features * linear.in_features
            new = SparseLinear(linear.in_features, linear.out_features, counts[name] / numel, **kwargs)
        else:
            new = SparseLinear(linear.in_features, linear.out_features, fan_in=min(fan_in, linear.in_features), **kwargs)
        _set_submodule(model, name, new)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def sparse_mlp(in_features: int, widths: Sequence[int], num_classes: int, *, fan_in: int,
               bias: bool = True, seed: int = 0) -> nn.Sequential:
    """A ReLU MLP of SparseLinear layers built directly (no dense layer ever exists), every
    neuron with ``min(fan_in, inputs)`` inputs: memory and time grow linearly with width."""
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be positive integers, got {tuple(widths)}")
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for i, w in enumerate([*widths, num_classes]):
        if i:
            layers.append(nn.ReLU())
        layers.append(SparseLinear(prev, w, fan_in=min(fan_in, prev), bias=bias, seed=seed + i))
        prev = w
    return nn.Sequential(*layers)
