"""Pruning at initialisation: the shared part of SNIP, GraSP and SynFlow.

The network starts dense. Inside the first ``step()`` (after the first batch's forward and
backward, before the optimizer moves anything) the method scores every sparsified weight once;
the highest scores are kept, ranked over all layers together (``scope="global"``, as the papers
do; the total is the distribution's total) or within each layer (``scope="layer"``: each layer
keeps exactly its budget from the density distribution). The pruned weights, their gradients
and their optimizer state are zeroed there, and the mask never changes afterwards.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..core import nm as nm_structure
from ..core.selection import largest_k
from ..core.target import SparseTarget
from .base import FirstStep, Method

SCOPES = ("global", "layer")


def dense_values(target: SparseTarget) -> torch.Tensor:
    """The target's weights as a flat tensor of length ``numel`` (zeros where inactive)."""
    values = target.active_values()
    out = torch.zeros(target.numel, dtype=values.dtype, device=values.device)
    out[target.active_indices()] = values
    return out


def parameters_of(targets: Sequence[SparseTarget], model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The model's parameters behind ``targets``, in the same order (for autograd)."""
    named = dict(model.named_parameters())
    return [named[t.name] for t in targets]


class PruneAtInit(Method):
    """Base of the pruning-at-init methods: subclasses give ``scores`` (keep the largest)."""

    dynamic = False
    decides_at_first_step = True
    sparse_backend = False
    sparse_backend_refusal = "prunes a dense network at the first step, which always-sparse layers never hold"

    def __init__(self, *, scope: str = "global"):
        super().__init__(grow_init="zero")
        if scope not in SCOPES:
            raise ValueError(f"unknown scope '{scope}'; choose one of {', '.join(SCOPES)}")
        self.scope = scope

    def init_masks(self, targets, gen) -> None:
        """Dense until the first step decides."""
        for t in targets:
            t.set_mask(torch.ones(t.rows, t.cols, dtype=torch.bool))

    def decide_masks(self, targets, first: FirstStep) -> None:
        scores = self.scores(targets, first)
        if self.nm is not None:   # N:M: the n best of every group, whatever the scope
            masks = {t.name: nm_structure.keep_top_per_group(t, scores[t.name].float().cpu(), *self.nm)
                     for t in targets}
        else:
            masks = self.keep_largest(targets, scores, {t.name: t.budget for t in targets})
        self.apply_masks(targets, masks)

    @staticmethod
    def apply_masks(targets: Sequence[SparseTarget], masks: dict[str, torch.Tensor]) -> None:
        """Set the decided masks (flat or [rows, cols]) once and for all."""
        for t in targets:
            t.set_mask(masks[t.name].view(t.rows, t.cols))
            # the dense weights were only scored, never trained: they were not explored
            t.restart_exploration()

    def scores(self, targets: Sequence[SparseTarget], first: FirstStep) -> dict[str, torch.Tensor]:
        """Flat score per weight of each target (higher: more worth keeping)."""
        raise NotImplementedError

    def keep_largest(self, targets: Sequence[SparseTarget], scores: dict[str, torch.Tensor],
                     counts: dict[str, int], total: int | None = None) -> dict[str, torch.Tensor]:
        """Flat bool masks keeping the largest scores: ``counts`` per layer, or ``total``
        (default: the counts' sum) over all layers together (global scope); ties go to the
        lower position."""
        if self.scope == "layer":
            out = {}
            for t in targets:
                mask = torch.zeros(t.numel, dtype=torch.bool, device=scores[t.name].device)
                mask[largest_k(scores[t.name], counts[t.name])] = True
                out[t.name] = mask
            return out
        flat = torch.cat([scores[t.name].reshape(-1).double().cpu() for t in targets])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[largest_k(flat, sum(counts.values()) if total is None else total)] = True
        return dict(zip([t.name for t in targets], keep.split([t.numel for t in targets])))
