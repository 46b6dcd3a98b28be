"""FLOPs accounting in the RigL paper's way (Evci et al., 2020, appendix H).

Costs are multiply-adds per sample. A layer's dense forward cost F_l is measured with hooks
during one forward pass: nn.Linear ``in * out`` per position, a convolution
``output elements * in_channels / groups * kernel size`` (a SparseConv2d the same, its
density then scaling it like a masked conv's), nn.MultiheadAttention its q/k/v and
output projections (and its two attention products, which are never sparse). A sparse
forward costs f_S = sum_l d_l F_l plus the dense cost of everything not sparsified.

Training, per step and sample: forward f_S, backward 2 f_S (input gradients and weight
gradients), so 3 f_S; a dense model costs 3 f_D. At a topology update step
- RigL, DST-EE and SRigL compute the dense weight gradient: 2 f_S + f_D;
- GSE computes the weight gradient only for its sampled subset S_l as well:
  3 f_S + sum_l (|S_l| / numel_l) F_l;
- SET, GMP and static need nothing extra (random or magnitude choices are negligible).
:class:`TrainFlops` adds these per actual step, with the densities of that step, so GMP's
shrinking density and the stop of updates at ``stop_fraction`` are integrated exactly. With an
update every dT steps throughout, the average is (3 f_S (dT - 1) + 2 f_S + f_D) / dT, the RigL
paper's (3 f_S dT' + 2 f_S + f_D) / (dT' + 1) with its cycle of dT' = dT - 1 plain steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..nn.sparse_attention import SparseMultiheadAttention
from ..nn.sparse_conv import SparseConv2d

#: how a method's update step computes gradients for growth
GROWTH_COSTS = ("none", "dense_grad", "subset_grad")


@dataclass(frozen=True)
class LayerFlops:
    """Dense forward multiply-adds per sample: per weight parameter, and the rest.

    ``per_param`` maps parameter names (as in ``model.named_parameters()``) to their dense
    cost; ``other`` is dense work that sparsity never removes (attention products).
    """

    per_param: dict[str, float]
    other: float = 0.0

    @property
    def dense(self) -> float:
        """f_D: the dense forward cost per sample."""
        return sum(self.per_param.values()) + self.other

    def forward(self, densities: Mapping[str, float]) -> float:
        """f_S: forward cost with the given per-parameter densities (absent: dense)."""
        unknown = set(densities) - set(self.per_param)
        if unknown:
            raise ValueError(f"no FLOPs were measured for parameter(s) {sorted(unknown)[:3]}")
        return self.other + sum(f * densities.get(name, 1.0) for name, f in self.per_param.items())


def measure_layer_flops(model: nn.Module, in_shape: tuple[int, ...]) -> LayerFlops:
    """Run one sample of zeros through ``model`` (eval mode, no grad) and count layer costs.

    The model's training mode is restored afterwards; no random numbers are consumed.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    per_param: dict[str, float] = {}
    other = [0.0]

    def add(param: torch.Tensor | None, flops: float) -> None:
        if param is not None and id(param) in names:
            per_param[names[id(param)]] = per_param.get(names[id(param)], 0.0) + float(flops)

    def linear_like(module, inputs, output):
        # an always-sparse layer names its values parameter; its dense cost is the full grid
        weight = getattr(module, getattr(module, "regrow_sparse_parameter", None) or "weight", None)
        if weight is None:
            return
        out_features = module.out_features
        add(weight, output.numel() / out_features * module.in_features * out_features)

    def conv(module, inputs, output):
        if isinstance(module, SparseConv2d):   # its dense grid: in_channels * kernel size per output
            add(module.values, output.numel() * module.taps_per_channel)
        else:
            add(module.weight, output.numel() * module.weight[0].numel())

    def attention(module, args, kwargs, output):
        q = kwargs.get("query", args[0] if len(args) > 0 else None)
        k = kwargs.get("key", args[1] if len(args) > 1 else None)
        e = module.embed_dim
        lq, ls = q.numel() // e, k.numel() // module.kdim
        if module.in_proj_weight is not None:
            add(module.in_proj_weight, lq * e * e + ls * e * module.kdim + ls * e * module.vdim)
        else:
            add(module.q_proj_weight, lq * e * e)
            add(module.k_proj_weight, ls * e * module.kdim)
            add(module.v_proj_weight, ls * e * module.vdim)
        add(module.out_proj.weight, lq * e * e)   # applied functionally: its own hook never fires
        other[0] += 2.0 * lq * ls * e               # q k^T and attention @ v

    def sparse_attention(module, args, kwargs, output):
        # its projections are SparseLinear layers with hooks of their own: only the products here
        q = kwargs.get("query", args[0] if len(args) > 0 else None)
        k = kwargs.get("key", args[1] if len(args) > 1 else None)
        lq, ls = q.numel() // module.embed_dim, k.numel() // module.kdim
        other[0] += 2.0 * lq * ls * module.embed_dim   # q k^T and attention @ v

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            hooks.append(module.register_forward_hook(attention, with_kwargs=True))
        elif isinstance(module, SparseMultiheadAttention):
            hooks.append(module.register_forward_hook(sparse_attention, with_kwargs=True))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, SparseConv2d)):
            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")
                                               and hasattr(module, "regrow_sparse_parameter")):
            hooks.append(module.register_forward_hook(linear_like))
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *in_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return LayerFlops(per_param, other[0])


def gse_subset_fraction(nnz: int, numel: int, gamma: float, drop_fraction: float) -> float:
    """|S| / numel for GSE's subset at an update (the engine's rule: max(k, ceil(gamma N)),
    capped by the inactive count)."""
    k = min(int(drop_fraction * nnz), numel - nnz)
    size = min(max(k, math.ceil(gamma * nnz)), numel - nnz)
    return size / numel if numel else 0.0


def step_flops(layers: LayerFlops, densities: Mapping[str, float], growth: str = "none",
               subset_fractions: Mapping[str, float] | None = None) -> float:
    """Training cost of one step per sample with the given densities.

    ``growth`` is what the step computes for a topology update: ``none`` (a plain step, or
    SET/GMP), ``dense_grad`` (RigL, DST-EE, SRigL) or ``subset_grad`` (GSE; pass
    ``subset_fractions``, |S_l| / numel_l per parameter).
    """
    f_s = layers.forward(densities)
    if growth == "none":
        return 3.0 * f_s
    if growth == "dense_grad":
        # the weight-gradient third of the backward pass becomes dense on sparsified layers
        return 2.0 * f_s + layers.forward({name: 1.0 for name in densities})
    if growth == "subset_grad":
        extra = sum(layers.per_param[name] * frac for name, frac in (subset_fractions or {}).items())
        return 3.0 * f_s + extra
    raise ValueError(f"unknown growth cost '{growth}'; choose one of {', '.join(GROWTH_COSTS)}")


@dataclass
class TrainFlops:
    """Running total of training FLOPs against dense training of the same model and steps."""

    layers: LayerFlops
    total: float = 0.0
    dense_total: float = 0.0
    steps: int = 0
    per_epoch: list = field(default_factory=list)
    _epoch_start: tuple[float, float] = (0.0, 0.0)

    def add_step(self, densities: Mapping[str, float], batch: int, growth: str = "none",
                 subset_fractions: Mapping[str, float] | None = None) -> None:
        self.total += batch * step_flops(self.layers, densities, growth, subset_fractions)
        self.dense_total += batch * 3.0 * self.layers.dense
        self.steps += 1

    @property
    def ratio(self) -> float:
        """Training FLOPs so far relative to dense training (1.0 before any step)."""
        return self.total / self.dense_total if self.dense_total else 1.0

    def end_epoch(self) -> float:
        """Ratio over the epoch just finished (also appended to ``per_epoch``)."""
        t0, d0 = self._epoch_start
        dt, dd = self.total - t0, self.dense_total - d0
        ratio = dt / dd if dd else 1.0
        self.per_epoch.append(ratio)
        self._epoch_start = (self.total, self.dense_total)
        return ratio

    def state_dict(self) -> dict:
        return {"total": self.total, "dense_total": self.dense_total, "steps": self.steps,
                "per_epoch": list(self.per_epoch), "epoch_start": list(self._epoch_start)}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.dense_total = float(state["total"]), float(state["dense_total"])
        self.steps, self.per_epoch = int(state["steps"]), list(state["per_epoch"])
        self._epoch_start = tuple(state["epoch_start"])


def growth_cost(method) -> str:
    """Which gradient a method's update step needs, for :func:`step_flops`."""
    from ..methods.gse import GSE
    if hasattr(method, "step_gradient_fraction"):
        return "subset_grad"   # Top-KAST: every step's weight gradient also covers B \ A
    if getattr(method, "observes_gradients", False):
        return "dense_grad"   # SNFS: the dense gradient at every step (the loop charges each one)
    if not getattr(method, "dynamic", False) or not getattr(method, "needs_grad", False):
        return "none"
    return "subset_grad" if isinstance(method, GSE) else "dense_grad"
