"""SET (Mocanu et al., 2018): drop the smallest |w|, grow uniformly at random.

Grown weights are drawn like the layer's own init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in
the SET paper (``grow_init="zero"`` gives zero-initialised growth instead).
"""
from __future__ import annotations

from ..core.sampling import uniform_inactive
from .base import Method, UpdateContext, register


@register
class SET(Method):
    name = "set"

    def __init__(self, *, grow_init: str = "random"):
        super().__init__(grow_init=grow_init)

    def grow(self, target, k: int, ctx: UpdateContext):
        return uniform_inactive(target, k, ctx.generator)
