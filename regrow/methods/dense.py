"""Dense training through the same loop: a baseline, every weight active, nothing masked."""
from __future__ import annotations

import torch

from .base import Method, register


@register
class Dense(Method):
    name = "dense"
    supports_nm = False
    dynamic = False
    masked = False
    sparse_backend = False
    sparse_backend_refusal = "trains every weight densely, which always-sparse layers cannot hold"

    def init_masks(self, targets, gen: torch.Generator) -> None:
        for t in targets:
            t.set_mask(torch.ones(t.rows, t.cols, dtype=torch.bool))
