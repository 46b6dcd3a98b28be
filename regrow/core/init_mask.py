"""Where DynamicSparsity's initial masks come from (its ``init_mask`` argument).

- ``"random"``: each layer's budget placed by the method's random rule (a fresh model);
- ``"magnitude"``: each layer keeps its largest |w| within its budget (dynamic sparse training
  from a pretrained dense model);
- ``"existing"``: the zeros already in the weights are the mask (a pruned checkpoint); the
  budgets are then the model's non-zero counts, so ``sparsity`` can only confirm them.

Building the engine with ``"random"`` on trained weights zeroes most of them: the two other
choices exist so that a trained model keeps what it learned.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import torch

INIT_MASKS = ("random", "magnitude", "existing")


def check_init_mask(init_mask: str, sparsity) -> None:
    if init_mask not in INIT_MASKS:
        raise ValueError(f"unknown init_mask {init_mask!r}; choose one of {', '.join(INIT_MASKS)}")
    if sparsity is None and init_mask != "existing":
        raise ValueError("sparsity is required (it may be omitted only with init_mask='existing', "
                         "which reads it from the model's zeros)")


def existing_counts(params: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Non-zero weights per parameter: the budgets of ``init_mask="existing"``."""
    return {name: int(torch.count_nonzero(p.detach())) for name, p in params.items()}


def agreed_sparsity(counts: Mapping[str, int], shapes: Mapping[str, Sequence[int]],
                    sparsity: float | None) -> float:
    """The model's own sparsity over ``shapes``; a given ``sparsity`` must match it (up to the
    one weight per layer that rounding a density into counts can move)."""
    total = sum(math.prod(s) for s in shapes.values())
    zeros = total - sum(counts.values())
    actual = zeros / total if total else 0.0
    if sparsity is not None and abs(round(sparsity * total) - zeros) > len(shapes):
        raise ValueError(f"init_mask='existing' takes the budgets from the model, whose sparsified weights "
                         f"are {actual:.4f} sparse ({zeros} zeros of {total}), not {sparsity}; "
                         "omit sparsity or pass the model's")
    return float(sparsity) if sparsity is not None else actual


def check_initialised(targets, init_mask: str, method) -> None:
    """Refuse an ``init_mask`` the method cannot honour instead of silently ignoring it."""
    if init_mask == "random":
        return
    if not method.masked or any(t.nnz == t.numel > t.budget for t in targets):
        raise ValueError(f"init_mask={init_mask!r} has no effect with method '{method.name}', which "
                         "starts from a dense network; use the default init_mask='random'")
    if init_mask == "existing":
        for t in targets:
            param = getattr(t, "param", None)   # a layer's own target (make_regrow_target) may lack one
            if param is not None and not torch.equal(t.mask.reshape(-1).cpu(), (param.detach() != 0).reshape(-1).cpu()):
                raise ValueError(f"method '{method.name}' cannot start from the model's zeros in '{t.name}': "
                                 "its own rule for the initial topology (e.g. SRigL's constant fan-in) "
                                 "chose another mask; use init_mask='magnitude'")


def warn_if_sparsity_unused(targets, sparsity: float | None) -> None:
    """Layers that fixed their own count (``regrow.nn.SparseLinear``) ignore ``sparsity``: say
    so when it differs from theirs, and that it does nothing at all when no other layer is left."""
    own = [t for t in targets if t.preinitialised]
    if sparsity is None or not own:
        return
    numel = sum(t.numel for t in own)
    zeros = numel - sum(t.nnz for t in own)
    if abs(round(sparsity * numel) - zeros) <= len(own):
        return
    nothing_else = len(own) == len(targets)
    warnings.warn(
        f"regrow: sparsity={sparsity} " + ("has no effect on any layer: every sparsified layer is always-sparse "
                                          if nothing_else else "does not apply to the always-sparse layers ")
        + f"{[t.name for t in own][:4]}, whose count was fixed when they were built (their sparsity is "
        f"{zeros / numel:.4f}); set it with regrow.nn.sparsify(model, sparsity=...)", UserWarning, stacklevel=3)
