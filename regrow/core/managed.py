"""One DynamicSparsity per model: a second one would re-initialise the masks the first keeps.

The claim is a weak reference held here, not an attribute on the model, so pickling or
deep-copying the model is unaffected, and a DynamicSparsity that is garbage-collected (or
closed with ``close()``) frees its model for a new one.
"""
from __future__ import annotations

import weakref

from torch import nn

_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def owner(model: nn.Module):
    """The live DynamicSparsity managing ``model``, or None."""
    ref = _OWNERS.get(model)
    return None if ref is None else ref()


def check_unclaimed(model: nn.Module) -> None:
    first = owner(model)
    if first is not None:
        raise ValueError(f"this model is already managed by {first!r}; a second DynamicSparsity would "
                         "re-initialise its masks. Call close() on the first (or delete it) before building "
                         "another, or build a fresh model")


def claim(model: nn.Module, engine) -> None:
    _OWNERS[model] = weakref.ref(engine)


def release(model: nn.Module, engine) -> None:
    if owner(model) is engine:
        del _OWNERS[model]
