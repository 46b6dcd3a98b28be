"""Sparse-aware initialisation: each neuron's weights scaled to its *active* fan-in.

PyTorch's default init for nn.Linear / nn.ConvNd (and Kaiming or LeCun inits) draws a weight
with standard deviation proportional to 1/sqrt(fan_in). A sparse neuron that keeps only
``a`` of its ``n`` inputs then sums ``a`` such terms, so its pre-activation variance is a/n
of the dense layer's: at 98% sparsity the signal shrinks by 7x per layer and the network
starts almost silent. Evci et al. (2022, "Gradient flow in sparse neural networks and how
lottery tickets win") fix this by initialising each neuron as a dense neuron whose fan-in is
its active fan-in: multiplying its active weights by sqrt(n / a) gives exactly that for any
fan-in-scaled initializer, and leaves the pre-activation variance equal to the dense one.
(For nn.MultiheadAttention's Xavier-initialised projections the same factor still restores
the dense pre-activation variance, which is the point of the rule.)
"""
from __future__ import annotations

import torch

SPARSE_INITS = (None, "fan_in")


def check_sparse_init(value) -> None:
    if value not in SPARSE_INITS:
        raise ValueError(f"unknown sparse_init {value!r}; choose 'fan_in' or None")


def fan_in_scales(row_counts: torch.Tensor, cols: int) -> torch.Tensor:
    """Per output neuron: sqrt(cols / active fan-in), 1.0 for a neuron with no active input."""
    counts = row_counts.to(torch.float64)
    scale = torch.ones_like(counts)
    alive = counts > 0
    scale[alive] = torch.sqrt(cols / counts[alive])
    return scale


@torch.no_grad()
def rescale_to_active_fan_in(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multiply each output neuron's (conv: output channel's) weights by sqrt(dense / active
    fan-in), in place; returns the per-neuron factors. ``mask`` has ``weight``'s shape."""
    rows = weight.shape[0]
    cols = weight.numel() // max(rows, 1)
    scale = fan_in_scales(mask.reshape(rows, cols).sum(1), cols)
    weight.mul_(scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1))))
    return scale
