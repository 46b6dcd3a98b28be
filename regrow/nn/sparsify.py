"""Build always-sparse networks: convert a model's nn.Linear, nn.Conv2d and nn.MultiheadAttention
layers (transformers and CNNs included), or build a wide MLP directly."""
from __future__ import annotations

from typing import Iterable, Sequence

import math

import torch
from torch import nn

from ..core.density import DISTRIBUTIONS, allocate_counts
from .sparse_attention import SparseMultiheadAttention
from .sparse_conv import SparseConv2d
from .sparse_linear import SparseLinear

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _layers(model: nn.Module, dense_layers: set[str]) -> list[tuple[str, nn.Module]]:
    """nn.Linear, nn.Conv2d and nn.MultiheadAttention modules to convert (an attention's
    out_proj goes with its attention: nn.MultiheadAttention reads it as a raw weight); raises
    for a convolution that has no always-sparse counterpart."""
    attentions = {name: m for name, m in model.named_modules()
                  if isinstance(m, nn.MultiheadAttention) and name not in dense_layers}
    inside = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    chosen = [(name, m) for name, m in model.named_modules() if name not in dense_layers and (
        name in attentions or (isinstance(m, nn.Linear) and id(m) not in inside)
        or isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)))]
    refused = {name: why for name, m in chosen if (why := _conv_refusal(m))}
    if refused:
        reasons = "; ".join(f"'{name}': {why}" for name, why in refused.items())
        raise ValueError(f"sparsify cannot convert {reasons}. Keep such layers on the masked backend "
                         f"with dense_layers={list(refused)}")
    return chosen


def _conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    """Numeric (symmetric) padding of a Conv2d, or None when 'same' would pad unevenly."""
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return tuple(m.padding)


def _conv_refusal(m: nn.Module) -> str | None:
    """Why a convolution cannot become a SparseConv2d (None when it can, or is no convolution)."""
    if isinstance(m, (nn.Conv1d, nn.Conv3d)):
        return f"{type(m).__name__}: only nn.Conv2d has an always-sparse counterpart so far"
    if not isinstance(m, nn.Conv2d):
        return None
    if type(m).forward is not nn.Conv2d.forward:
        return f"{type(m).__name__} overrides nn.Conv2d.forward, which SparseConv2d would drop"
    if m.groups != 1:
        return f"groups={m.groups}: SparseConv2d is a groups=1 convolution"
    if m.padding_mode != "zeros":
        return f"padding_mode='{m.padding_mode}': SparseConv2d pads with zeros only"
    if _conv_padding(m) is None:
        return "padding='same' that pads unevenly (an even dilated kernel extent)"
    return None


def _shapes(name: str, m: nn.Module) -> dict[str, tuple[int, ...]]:
    """The weight shape of each always-sparse layer a module becomes (the masked backend's
    parameter shape, so that both backends allocate the same counts)."""
    if isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        return {f"{name}.q_proj": (e, e), f"{name}.k_proj": (e, m.kdim), f"{name}.v_proj": (e, m.vdim),
                f"{name}.out_proj": (e, e)}
    return {name: tuple(m.weight.shape)}


def sparsify(model: nn.Module, sparsity: float | None = None, *, fan_in: int | None = None,
             distribution: str = "erk", seed: int = 0, dense_layers: Iterable[str] = ()) -> nn.Module:
    """Replace ``model``'s nn.Linear layers with :class:`SparseLinear`, its nn.Conv2d layers with
    :class:`SparseConv2d` and its nn.MultiheadAttention modules with
    :class:`SparseMultiheadAttention` (q, k, v and output projections as SparseLinear; in place;
    returns ``model``). This covers transformers (nn.TransformerEncoderLayer / DecoderLayer,
    regrow's ViT, its patch embedding included) and CNNs (regrow's ResNets, VGGs, LeNet-5):
    batch norm, pooling and residual connections stay as they are.

    Convolutions it cannot convert raise a ValueError naming them (keep them on the masked
    backend with ``dense_layers``): nn.Conv1d and nn.Conv3d (only 2-D convolutions have an
    always-sparse layer so far), groups > 1 (depthwise, grouped), padding_mode other than
    zeros, padding='same' that pads unevenly, and Conv2d subclasses with their own forward.

    Exactly one of:

    * ``sparsity``: overall fraction of zero weights over the converted layers; the per-layer
      non-zero counts come from :func:`regrow.density.allocate_counts` with ``distribution``
      (uniform, er, erk), exactly as the masked backend allocates them;
    * ``fan_in``: every output neuron gets ``min(fan_in, in_features)`` inputs, so N grows
      linearly with width.

    Each new layer gets a fresh constant fan-in topology (seed ``seed + i`` for the i-th layer)
    and fresh values (see SparseLinear); nothing of the dense weights is copied (see
    :meth:`SparseMultiheadAttention.from_masked` and :meth:`SparseLinear.from_dense` to keep
    trained weights). An attention's four projections count as four layers of the allocation.
    Modules named in ``dense_layers`` stay as they are; other layer types are left to the
    masked backend.

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
    layers = _layers(model, dense)
    if not layers:
        raise ValueError("the model has no nn.Linear, nn.Conv2d or nn.MultiheadAttention layer to sparsify")
    shapes = {k: v for name, m in layers for k, v in _shapes(name, m).items()}
    counts = allocate_counts(shapes, 1.0 - sparsity, distribution) if sparsity is not None else None
    index = {name: i for i, name in enumerate(shapes)}   # seeds follow the order of the layers

    def count(name: str) -> dict:
        """``density`` or ``fan_in`` of layer ``name``, whose rows are its first dimension."""
        shape = shapes[name]
        if counts is not None:
            return {"density": counts[name] / math.prod(shape)}
        return {"fan_in": min(fan_in, math.prod(shape[1:]))}

    def build(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> SparseLinear:
        out_f, in_f = shapes[name]
        return SparseLinear(in_f, out_f, bias=bias is not None, seed=seed + index[name], device=weight.device,
                            dtype=weight.dtype, **count(name))

    def build_conv(name: str, m: nn.Conv2d) -> SparseConv2d:
        return SparseConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, _conv_padding(m), m.dilation,
                            bias=m.bias is not None, seed=seed + index[name], device=m.weight.device,
                            dtype=m.weight.dtype, **count(name))

    for name, m in layers:
        if isinstance(m, nn.MultiheadAttention):
            new = SparseMultiheadAttention.from_attention(m, lambda part, w, b, name=name: build(f"{name}.{part}", w, b))
        elif isinstance(m, nn.Conv2d):
            new = build_conv(name, m)
        else:
            new = build(name, m.weight, m.bias)
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
