"""SRigL (Lasby et al., 2023): RigL with constant fan-in and neuron ablation.

Every active output neuron (conv: output channel) keeps the same number of active inputs.
One update of a layer with N active weights and k = floor(alpha_t * N) follows the official
code (calgaryml/condensed-sparsity, ``rigl_constant_fan.py::_rigl_step``):

1. *Salient* weights are the union of the N - k active weights of largest |w| (what RigL
   keeps) and the k positions of largest |grad| over the whole layer (what RigL would grow;
   the official code takes them from the full layer, active ones included).
2. A neuron is ablated when it has fewer than ``max(1, floor(gamma_sal * f0))`` salient
   weights, f0 the layer's *initial* fan-in (official ``use_sparse_const_fan_in_for_ablation``),
   so the threshold does not rise as neurons disappear. Guard (official): the threshold is
   lowered to the salient count of the (m + 1)-th most salient neuron, m = total // cols,
   so enough neurons survive that the new fan-in fits in a row. Ablation is not cumulative:
   an ablated neuron returns when its salient count reaches the threshold again.
3. The layer's budget (its weight count at initialisation) is shared by the survivors:
   fan-in = floor(total / active), short of the total by less than one weight per neuron.
4. Each surviving neuron keeps its kept weights of largest |w| up to the fan-in, then grows
   the non-kept positions of largest |grad| (positions dropped this step included, as in the
   official code); grown weights start at ``grow_init`` (zero), weights that stay active keep
   their value and optimizer state.

The gradient is read in blocks of rows (``core.row_blocks``), never whole, so the same update
runs on always-sparse layers (SparseLinear) without any out x in tensor; such a layer's budget
is the N it was built with.

Where regrow departs from the official code, on purpose:

* The last sparsified layer (the classifier) is never ablated by default. The official code
  means to exempt it (``no_ablation_module_names is None and idx == last_layer_idx``), but its
  base class turns None into [] first, so the branch never fires and only layers named in a
  config are exempt (its ResNet/ViT configs name the classifier; MLP ones do not). Ablating a
  classifier row deletes a class's logit. ``exempt_layers`` names the exempt layers instead
  (parameter or module names; ``()`` exempts none).
* Initial fan-ins are chosen jointly over the network (``core.density.constant_fan_ins``):
  the official code floors each layer and drops the remainders, landing below the target.
* A row holding more kept weights than the new fan-in keeps those of largest |w|; the
  official code sorts the boolean mask there, so which ones survive follows index order.
* Equal scores are ordered by the seeded hash of ``UpdateContext.ties`` (the official code
  leaves them to ``torch.topk``).
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..core.density import constant_fan_ins
from ..core.row_blocks import grad_magnitude, rank_within_rows, top_candidates, top_candidates_per_row
from ..core.selection import smallest_k
from ..core.sorted_keys import contains, merge_sorted, union_sorted
from .base import Method, UpdateContext, register


@register
class SRigL(Method):
    name = "srigl"
    needs_grad = True

    def __init__(self, *, gamma_sal: float = 0.3, ablation: bool = True,
                 exempt_layers: Iterable[str] | None = None, grow_init: str = "zero"):
        super().__init__(grow_init=grow_init)
        if not 0.0 <= gamma_sal <= 1.0:
            raise ValueError(f"gamma_sal must be in [0, 1], got {gamma_sal}")
        if isinstance(exempt_layers, str):
            raise ValueError(f"exempt_layers takes a list of layer names, got the string {exempt_layers!r}")
        self.gamma_sal, self.ablation = gamma_sal, ablation
        self.exempt_layers = None if exempt_layers is None else tuple(exempt_layers)
        self.totals: dict[str, int] = {}   # fan_in * rows at init: the budget ablation redistributes
        self.initial_fan_in: dict[str, int] = {}
        self.exempt: set[str] = set()      # parameter names never ablated

    def attach(self, targets):
        self.exempt = self._exempt_names(list(targets))
        for t in targets:
            if t.preinitialised:   # an always-sparse layer brings its own N: that is its budget
                self.initial_fan_in[t.name] = max(1, t.nnz // t.rows)
                self.totals[t.name] = t.nnz

    def init_masks(self, targets, gen):
        if self.nm is not None:   # N:M: N per group is itself a constant fan-in
            return super().init_masks(targets, gen)
        targets = list(targets)
        fan_ins = constant_fan_ins([(t.rows, t.cols, t.budget) for t in targets])
        for t, fan_in in zip(targets, fan_ins):
            if self.init_mask == "random":
                order = torch.rand(t.rows, t.cols, generator=gen).argsort(dim=1)
            else:   # each row keeps its fan-in largest priorities (|w|, or the existing non-zeros)
                order = self.init_priority(t).cpu().argsort(dim=1, descending=True, stable=True)
            mask = torch.zeros(t.rows, t.cols, dtype=torch.bool)
            mask.scatter_(1, order[:, :fan_in], True)
            t.set_mask(mask)
            self.initial_fan_in[t.name] = fan_in
            self.totals[t.name] = fan_in * t.rows

    def _exempt_names(self, targets) -> set[str]:
        if not targets:
            return set()
        if self.exempt_layers is None:
            return {targets[-1].name}   # the last sparsified layer: the classifier
        names = {t.name: t.name.rsplit(".", 1)[0] for t in targets}
        unknown = [e for e in self.exempt_layers if e not in names and e not in names.values()]
        if unknown:
            raise ValueError(f"srigl exempt_layers {unknown} are not sparsified layers; "
                             f"choose among {sorted(names)}")
        return {n for n, module in names.items() if n in self.exempt_layers or module in self.exempt_layers}

    def grow_scores(self, target, candidates, ctx):
        """|dL/dw| of given candidates: with N:M, SRigL is its constant fan-in within groups
        (each group regrows by |grad| what it lost; no neuron is ablated)."""
        return target.grad_at(candidates).abs()

    def update(self, target, ctx: UpdateContext) -> None:
        if self.nm is not None:
            return super().update(target, ctx)
        rows, cols = target.rows, target.cols
        k = self.rewire_count(target, ctx)
        if k <= 0:
            return
        active = target.active_indices()
        magnitude = target.active_values().abs()

        def ties(flat):
            return ctx.ties(target, flat)

        # 1. saliency: RigL's keep set plus the top-k |grad| over the whole layer
        is_kept = torch.ones(active.numel(), dtype=torch.bool, device=active.device)
        is_kept[smallest_k(magnitude, k, tie_keys=ties(active))] = False
        kept = active[is_kept]
        top_grad = top_candidates(target, k, grad_magnitude, ties, excluded=active[:0])
        salient = union_sorted(kept, top_grad)

        # 2-3. ablation and the survivors' fan-in
        alive = self._surviving_neurons(target, torch.bincount(salient // cols, minlength=rows))
        fan_in = min(cols, self.totals[target.name] // int(alive.sum()))

        # 4. per row: kept weights by |w| up to the fan-in, then everything else by |grad|,
        #    ties by the hash
        kept_row = kept // cols
        stays = (rank_within_rows(kept_row, magnitude[is_kept], ties(kept)) < fan_in) & alive[kept_row]
        short = (fan_in - torch.bincount(kept_row, minlength=rows)).clamp(min=0) * alive
        regrown = top_candidates_per_row(target, short, grad_magnitude, ties, excluded=kept)
        new = merge_sorted(kept[stays], regrown)

        drop = active[~contains(new, active)] if new.numel() else active
        grow = regrown[~target.is_active(regrown)]
        target.rewire(drop, grow, self.grow_values(target, grow.numel(), ctx.generator, grow))
        counts = target.row_counts()
        assert bool(((counts == 0) | (counts == fan_in)).all()), "srigl fan-in must be constant"

    def ablation_threshold(self, target, salient_per_row: torch.Tensor) -> int:
        """Minimum salient count a neuron needs to survive (0: nothing is ablated)."""
        if not self.ablation or self.gamma_sal == 0 or target.name in self.exempt:
            return 0
        threshold = max(1, int(self.gamma_sal * self.initial_fan_in[target.name]))
        # official guard: at least m + 1 neurons survive, m = total // cols, so the new
        # fan-in floor(total / active) never exceeds the row length
        m = self.totals[target.name] // target.cols
        if m >= target.rows:
            return 0
        guard = int(salient_per_row.sort(descending=True).values[m])
        return min(threshold, guard)

    def _surviving_neurons(self, target, salient_per_row: torch.Tensor) -> torch.Tensor:
        return salient_per_row >= self.ablation_threshold(target, salient_per_row)

    def state_dict(self) -> dict:
        return {"totals": dict(self.totals), "initial_fan_in": dict(self.initial_fan_in)}

    def load_state_dict(self, state: dict) -> None:
        self.totals = dict(state["totals"])
        # both are rebuilt at construction from the same budgets; older checkpoints lack the second
        self.initial_fan_in.update(state.get("initial_fan_in", {}))
