"""SNIP (Lee et al., ICLR 2019): single-shot pruning by connection sensitivity.

Keeps the weights with the largest |dL/dw * w| on the first batch (the sensitivity of the loss
to removing each connection, up to a common normalisation), then trains the fixed sparse
network. The gradient is the first ``step()``'s, taken on the dense initial network.
"""
from __future__ import annotations

from .base import register
from .prune_at_init import PruneAtInit, dense_values


@register
class SNIP(PruneAtInit):
    name = "snip"
    needs_grad = True

    def scores(self, targets, first):
        return {t.name: (t.dense_grad().reshape(-1) * dense_values(t).to(t.dense_grad().dtype)).abs()
                for t in targets}
