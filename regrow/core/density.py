"""Per-layer density allocation: uniform, Erdős–Rényi (SET) and Erdős–Rényi-Kernel (RigL).

Every function returns exact integer non-zero counts whose sum is round(density * total).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

DISTRIBUTIONS = ("uniform", "er", "erk")


def _raw_density(shape: Sequence[int], distribution: str) -> float:
    """Un-normalised density of one layer before the global scale is solved."""
    if distribution == "uniform" or len(shape) < 2:
        return 1.0
    if distribution == "er":
        n_out, n_in = shape[0], shape[1]
        return (n_in + n_out) / (n_in * n_out)
    # erk: sum of every dimension of the kernel over their product
    return sum(shape) / math.prod(shape)


def _named_shapes(shapes) -> tuple[dict, bool]:
    """``shapes`` (a mapping name -> shape, or a sequence of shapes, named by position) as a
    dict of int tuples, and whether it was a sequence; anything else is a one-line error."""
    if isinstance(shapes, Mapping):
        named, was_sequence = dict(shapes), False
    elif isinstance(shapes, Sequence) and not isinstance(shapes, str):
        named, was_sequence = dict(enumerate(shapes)), True
    else:
        raise ValueError(f"shapes must be a mapping name -> shape or a sequence of shapes, got {type(shapes).__name__}")
    out = {}
    for name, shape in named.items():
        dims = tuple(shape) if isinstance(shape, Sequence) and not isinstance(shape, str) else None
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise ValueError(f"the shape of layer {name!r} must be a non-empty sequence of positive integers, "
                             f"got {shape!r}" + (" (pass a list of shapes, not one shape)"
                                                 if isinstance(shape, int) else ""))
        out[name] = dims
    return out, was_sequence


def layer_densities(shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]], density: float,
                    distribution: str = "erk") -> dict[str, float] | list[float]:
    """Real-valued density per layer so that the total number of non-zeros is
    ``density * total``; any layer that would exceed density 1 is made dense and the
    scale is solved again over the rest (RigL's loop). ``shapes`` is a mapping name -> shape
    (a dict comes back) or a sequence of shapes (a list comes back, in the same order)."""
    shapes, was_sequence = _named_shapes(shapes)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution '{distribution}'; choose one of {', '.join(DISTRIBUTIONS)}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: _raw_density(shape, distribution) for name, shape in shapes.items()}
    budget = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        if not free:
            break
        remaining = budget - sum(numel[n] for n in dense)
        scale = remaining / sum(raw[n] * numel[n] for n in free)
        saturated = [n for n in free if scale * raw[n] > 1.0]
        if not saturated:
            break
        dense.update(saturated)
    out = {n: 1.0 if n in dense else min(1.0, scale * raw[n]) for n in shapes}
    return list(out.values()) if was_sequence else out


def allocate_counts(shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]], density: float,
                    distribution: str = "erk") -> dict[str, int] | list[int]:
    """Exact integer non-zero counts per layer: for a mapping name -> shape a dict, for a
    sequence of shapes a list in the same order.

    Counts are the real-valued shares rounded by largest remainder, so the sum is exactly
    ``round(density * total)`` and every layer is within one weight of its share; a layer is
    never left empty (it takes one weight from the largest layer, or adds one when the target
    is smaller than the number of layers).
    """
    shapes, was_sequence = _named_shapes(shapes)
    densities = layer_densities(shapes, density, distribution)
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    target = round(density * sum(numel.values()))
    share = {n: densities[n] * numel[n] for n in shapes}
    counts = {n: min(numel[n], math.floor(share[n])) for n in shapes}
    by_remainder = sorted(shapes, key=lambda n: -(share[n] - math.floor(share[n])))
    missing = target - sum(counts.values())
    for n in by_remainder:
        if missing <= 0:
            break
        if counts[n] < numel[n]:
            counts[n] += 1
            missing -= 1
    for n in shapes:
        if counts[n] == 0:
            donor = max(counts, key=counts.get)
            if counts[donor] > 1:   # always true when the target is at least one per layer
                counts[donor] -= 1
            counts[n] = 1
    return list(counts.values()) if was_sequence else counts


def constant_fan_ins(layers: Sequence[tuple[int, int, int]]) -> list[int]:
    """Integer fan-ins for constant-fan-in layers (SRigL), one per ``(rows, cols, budget)``.

    Each layer takes floor(budget / rows) or one more (never below 1 nor above ``cols``), so it
    holds at most ``rows`` weights more than its budget; which layers round up is chosen so
    that the network's total, sum(fan_in * rows), is as close to the sum of the budgets as
    integer fan-ins allow (an exact subset sum over the round-up candidates, a bitset per
    layer; ties go to the total below the target). Rounding each layer on its own instead
    can miss the target by several percent at high sparsity, and the official code
    (condensed-sparsity) floors every layer, always falling short.
    """
    base = [min(cols, max(1, budget // rows)) for rows, cols, budget in layers]
    deficit = sum(b for _, _, b in layers) - sum(f * r for f, (r, _, _) in zip(base, layers))
    up = [i for i, (f, (r, c, b)) in enumerate(zip(base, layers)) if f < c and f * r < b]
    reach, history = 1, []          # bit s of reach: some subset of the candidates adds s weights
    for i in up:
        history.append(reach)
        reach |= reach << layers[i][0]
    best = min((s for s in range(reach.bit_length()) if reach >> s & 1),
               key=lambda s: (abs(s - deficit), s > deficit))
    fan_ins = list(base)
    for i, before in zip(reversed(up), reversed(history)):
        if not before >> best & 1:   # this sum needs layer i rounded up
            fan_ins[i] += 1
            best -= layers[i][0]
    return fan_ins
