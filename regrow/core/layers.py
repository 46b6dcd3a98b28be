"""Finds the parameters to sparsify.

Default: the weights of nn.Linear and nn.Conv1d/2d/3d, and nn.MultiheadAttention's input
projections (``in_proj_weight`` or ``q/k/v_proj_weight``; its ``out_proj`` is an nn.Linear).
Biases, norms and embeddings stay dense unless named explicitly.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable

from torch import nn

SPARSIFIABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class Sparsifiable:
    """One parameter to sparsify, with the module that owns it."""

    name: str            # as in model.named_parameters()
    param: nn.Parameter
    module: nn.Module
    module_name: str


def _owned_parameters(model: nn.Module) -> list[tuple[str, str, nn.Module, str, nn.Parameter]]:
    """(full name, module name, module, attribute, param) for every distinct parameter."""
    seen: set[int] = set()
    out = []
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{attr}" if module_name else attr
            out.append((full, module_name, module, attr, param))
    return out


def _default_choice(module: nn.Module, attr: str) -> bool:
    sparse_attr = getattr(module, "regrow_sparse_parameter", None)
    if sparse_attr is not None:   # an always-sparse layer names its values parameter
        return attr == sparse_attr
    if isinstance(module, SPARSIFIABLE_MODULES):
        return attr == "weight"
    if isinstance(module, nn.MultiheadAttention):
        return attr in _ATTENTION_WEIGHTS
    return False


def find_sparsifiable(model: nn.Module, targets: Iterable | None = None,
                      dense_layers: Iterable[str] = ()) -> list[Sparsifiable]:
    """The parameters of ``model`` to sparsify, in registration order.

    Args:
        targets: optional explicit selection instead of the default; items may be parameter
            names, module names, nn.Parameter objects or nn.Module objects (a module contributes
            its parameters of two or more dimensions, or all of them if it has none).
        dense_layers: parameter names (``"fc1.weight"``) or module names (``"fc1"``) to keep dense.
    """
    owned = _owned_parameters(model)
    if targets is None:
        chosen = [o for o in owned if _default_choice(o[2], o[3])]
    else:
        chosen = _explicit(owned, list(targets), dict(model.named_modules()))
    dense = set(dense_layers)
    known = {o[0] for o in owned} | {o[1] for o in owned if o[1]}
    unknown = sorted(d for d in dense if d not in known)
    if unknown:
        raise ValueError(f"dense_layers names unknown layer(s) {unknown}; {_valid_names_hint(unknown, known)}")
    return [Sparsifiable(full, param, module, mname) for full, mname, module, _, param in chosen
            if full not in dense and mname not in dense]


def _valid_names_hint(unknown: list[str], known: set[str]) -> str:
    """The closest valid names to each unknown one, else every valid name (up to 20)."""
    close = sorted({c for u in unknown for c in difflib.get_close_matches(u, known, n=3, cutoff=0.6)})
    if close:
        return f"did you mean {close}? (parameter names from model.named_parameters() or module names)"
    names = sorted(known)
    more = f" and {len(names) - 20} more" if len(names) > 20 else ""
    return f"valid names: {names[:20]}{more}"


def _explicit(owned, targets: list, modules: dict[str, nn.Module]) -> list:
    by_name = {o[0]: o for o in owned}
    by_id = {id(o[4]): o for o in owned}
    modules = {name: m for name, m in modules.items() if name}
    picked: dict[str, tuple] = {}
    for item in targets:
        if isinstance(item, str) and item not in by_name and item in modules:
            item = modules[item]   # a module name: that module's weights, as for the module itself
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"targets names unknown parameter or module '{item}'; "
                                 f"{_valid_names_hint([item], set(by_name) | set(modules))}")
            picked[item] = by_name[item]
        elif isinstance(item, nn.Parameter):
            if id(item) not in by_id:
                raise ValueError("targets holds a parameter that does not belong to the model")
            picked[by_id[id(item)][0]] = by_id[id(item)]
        elif isinstance(item, nn.Module):
            params = [p for p in item.parameters()]
            if not any(id(p) in by_id for p in params):
                raise ValueError(f"targets holds a {type(item).__name__} that is not part of the model")
            wide = [p for p in params if p.dim() >= 2] or params
            for p in wide:
                picked[by_id[id(p)][0]] = by_id[id(p)]
        else:
            raise ValueError(f"targets items must be names, parameters or modules, got {type(item).__name__}")
    order = {o[0]: i for i, o in enumerate(owned)}
    return sorted(picked.values(), key=lambda o: order[o[0]])
