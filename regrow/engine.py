"""DynamicSparsity: keeps a model sparse while it trains and rewires it when due."""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Iterable

import torch
from torch import nn

from .backends import MaskedTarget, make_target, owns_topology
from .core.density import DISTRIBUTIONS, allocate_counts
from .core.distributed import check_masks_agree, unwrap
from .core.layers import find_sparsifiable
from .methods import METHODS, REGISTRY, UpdateContext, make_method
from .methods.base import FirstStep
from .core.first_input import FirstInputShape
from .core.metrics import rewired_counts, sparsity_stats
from .core.flat import put_flat
from .core.optim_state import OptimizerStateMasker, check_optimizer, per_weight_state
from .core.schedules import UpdateSchedule
from .core import nm as nm_structure
from .core.sparse_init import check_sparse_init, rescale_to_active_fan_in
from .core.init_mask import (agreed_sparsity, check_init_mask, check_initialised, existing_counts,
                             warn_if_sparsity_unused)
from .core import managed
from .core.capture import check_captured


def _warn_if_never_updated(method, schedule: UpdateSchedule) -> None:
    """A dynamic method whose schedule has no update step trains as static: say so once."""
    if not method.dynamic or schedule.update_steps():
        return
    warnings.warn(
        f"regrow: method '{method.name}' will never update its topology: updates happen every "
        f"update_interval={schedule.interval} steps before step {schedule.end:g} "
        f"(stop_fraction={schedule.stop_fraction} x total_steps={schedule.total_steps}), and there is "
        "none; it trains as static. Lower update_interval or train for more steps.",
        UserWarning, stacklevel=3)


def _detach_targets(targets) -> None:
    for target in targets:
        target.release()
        target.detach()


class DynamicSparsity:
    """Dynamic sparse training for any model and optimizer.

    ``step()`` replaces ``optimizer.step()``: it masks the gradients, steps the optimizer,
    re-applies the masks and, every ``update_interval`` steps until
    ``stop_fraction * total_steps``, drops and regrows connections by the chosen method::

        dst = regrow.DynamicSparsity(model, optimizer, method="rigl", sparsity=0.9, total_steps=T)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            dst.step()

    At an update step the optimizer steps first (with the old topology); the update then uses
    the gradient of that step's batch, so grown weights start exactly at their initial value
    (zero, or as the method documents) with zero optimizer state.

    Args:
        model: the network. By default the weights of nn.Linear, nn.Conv1d/2d/3d and
            nn.MultiheadAttention's projections are sparsified.
        optimizer: SGD, Adam, AdamW or a subclass, holding the sparsified parameters.
        method: one of ``regrow.METHODS``: dense, static, set, rigl, gse, dstee, srigl, gmp.
        sparsity: fraction of the sparsified weights that are zero, in [0, 1) (may be omitted
            with ``init_mask="existing"``, which reads it from the model).
        total_steps: number of ``step()`` calls the run will make (for the schedules).
        distribution: per-layer density allocation: ``uniform``, ``er`` or ``erk``.
        update_interval: steps between topology updates (dT).
        drop_fraction: fraction of each layer's active weights rewired at the first update (alpha).
        drop_schedule: how the drop fraction decays: ``cosine``, ``linear`` or ``constant``.
        stop_fraction: no updates after ``stop_fraction * total_steps``.
        dense_layers: parameter or module names to keep dense.
        seed: seeds every random choice (initial masks, SET, GSE sampling).
        targets: optional explicit list of parameters, parameter names or modules to sparsify.
        allow_any_optimizer: accept optimizers other than SGD/Adam/AdamW, zeroing every state
            tensor shaped like its parameter.
        sparse_init: ``"fan_in"`` (default) rescales, once at construction, each output neuron's
            (conv: output channel's) active weights by sqrt(dense fan-in / active fan-in), so
            its pre-activation variance is the dense layer's (Evci et al. 2022; assumes a
            fan-in-scaled init such as PyTorch's default, Kaiming or LeCun); randomly grown
            weights (``grow_init="random"``) use the same per-neuron scale. ``None`` leaves the
            model's values as they are. SparseLinear layers already initialise for their own
            fan-in and are left alone.
        init_mask: the initial masks: ``"random"`` (default, for a fresh model: the method's
            random placement), ``"magnitude"`` (keep each layer's largest |w| within its budget:
            DST from a pretrained dense model) or ``"existing"`` (adopt the zeros already in the
            weights, e.g. a pruned checkpoint: the budgets are the model's non-zero counts and
            ``sparsity``, if given, must agree). ``"random"`` zeroes trained weights: build the
            engine on a trained model with one of the two others. Only ``"random"`` applies
            ``sparse_init``'s rescaling (trained values are kept). Methods that start dense
            (dense, gmp, pruning at init) refuse the other two.
        check_masks: under torch.distributed, all-reduce a mask checksum at construction, at
            checkpoint load and after every topology update, and raise ``MaskDivergenceError``
            naming the first layer where ranks disagree (no-op in one process).
        **method_options: per method:
            set: ``grow_init`` ("random", default; or "zero");
            rigl: ``grow_init`` ("zero");
            gse: ``gamma`` (1.0, subset size / active count), ``sampling``
            ("uniform", "grabo", "graest"), ``grow_init``;
            dstee: ``c`` (1e-3), ``eps`` (1.0), ``grow_init``;
            srigl: ``gamma_sal`` (0.3), ``ablation`` (True), ``exempt_layers`` (None: the
            last sparsified layer), ``grow_init``;
            gmp: ``begin_fraction`` (0.0);
            snip, grasp: ``scope`` ("global", or "layer"); synflow: ``rounds`` (100), ``scope``;
            snfs: ``momentum`` (0.9, smoothing of its running dense-gradient mean), ``grow_init``;
            mest: ``lam`` (1e-2), ``mutation_schedule`` ("engine" or "mest"), ``grow_init``;
            cht: ``soft`` (False; True: CHTs), ``temperature`` (1.0), ``grow_init``;
            topkast: ``backward_extra`` (None: M = D), ``penalty`` (1e-4).
        nm: ``"N:M"``, e.g. ``"2:4"``: exactly N active weights in every group of M consecutive
            input weights of each output row (conv: M input channels at one kernel tap); every
            layer then has sparsity 1 - N/M (``sparsity`` may be left out; a different one is an
            error), the distribution does not apply, and updates drop and regrow inside groups
            (growth ranked by the method's grow score; random-growth methods at random).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, method: str,
                 sparsity: float | None = None, total_steps: int, distribution: str = "erk",
                 update_interval: int = 100, drop_fraction: float = 0.3,
                 drop_schedule: str = "cosine", stop_fraction: float = 0.75,
                 dense_layers: Iterable[str] = (), seed: int = 0,
                 targets: Iterable | None = None, allow_any_optimizer: bool = False,
                 check_masks: bool = True, sparse_init: str | None = "fan_in",
                 init_mask: str = "random", nm: str | None = None, **method_options):
        model = unwrap(model)   # a DDP wrapper: same names and checkpoints as in one process
        managed.check_unclaimed(model)   # a second engine would silently re-draw the masks
        if method not in REGISTRY:
            raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
        self.nm = nm_structure.parse_nm(nm)
        if self.nm is not None:
            sparsity = nm_structure.nm_sparsity(self.nm, sparsity)
        check_init_mask(init_mask, sparsity)
        if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
                                     or not 0.0 <= sparsity < 1.0):
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution '{distribution}'; choose one of {', '.join(DISTRIBUTIONS)}")
        self.schedule = UpdateSchedule(total_steps=total_steps, interval=update_interval,
                                       drop_fraction=drop_fraction, schedule=drop_schedule,
                                       stop_fraction=stop_fraction)
        check_optimizer(optimizer, allow_any_optimizer)
        check_sparse_init(sparse_init)
        self.method = make_method(method, method_options)
        if self.nm is not None and (not self.method.supports_nm or init_mask == "existing"):
            raise ValueError(f"nm='{nm}' works with methods "
                             f"{', '.join(m for m in METHODS if REGISTRY[m].supports_nm)} and a random or "
                             f"magnitude init_mask, not method '{method}' with init_mask '{init_mask}'")
        _warn_if_never_updated(self.method, self.schedule)
        self.model, self.optimizer = model, optimizer
        self.sparsity = None if sparsity is None else float(sparsity)   # "existing": set below
        self.distribution, self.seed, self.init_mask = distribution, seed, init_mask
        self.check_masks = check_masks

        found = find_sparsifiable(model, targets, dense_layers)
        if not found:
            raise ValueError("the model has nothing to sparsify: no nn.Linear, nn.ConvNd or "
                             "nn.MultiheadAttention weights (pass targets=[...] to choose parameters)")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [s.name for s in found if id(s.param) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the sparsified parameter(s) {missing[:5]}; "
                             "build it from model.parameters() before creating DynamicSparsity")

        # always-sparse layers were built with their own count; allocate over the others only
        masked = {s.name: tuple(s.param.shape) for s in found if not owns_topology(s)}
        if init_mask == "existing":   # the model's zeros are the mask: its counts are the budgets
            budgets = existing_counts({s.name: s.param for s in found if s.name in masked})
            self.sparsity = agreed_sparsity(budgets, masked, self.sparsity)
        elif self.nm is not None:   # every layer at exactly N/M: the distribution does not apply
            budgets = {name: math.prod(shape) * self.nm[0] // self.nm[1] for name, shape in masked.items()}
        else:
            density = 1.0 if method == "dense" else 1.0 - self.sparsity
            budgets = allocate_counts(masked, density, distribution) if masked else {}
        state = OptimizerStateMasker(optimizer)
        self.targets = [make_target(s, budgets.get(s.name, s.param.numel()), state) for s in found]
        always_sparse = [t.name for t in self.targets if not isinstance(t, MaskedTarget)]
        if always_sparse and not self.method.sparse_backend:
            raise ValueError(f"method '{method}' {self.method.sparse_backend_refusal} (always-sparse layers "
                             f"{always_sparse[:3]}); use one of "
                             f"{', '.join(m for m in METHODS if REGISTRY[m].sparse_backend)}")

        self.generator = torch.Generator().manual_seed(seed)
        self.method.plan(self.schedule)
        self.method.attach(self.targets)
        self.method.init_mask = init_mask
        if self.nm is not None:
            nm_structure.check_layers(self.targets, self.nm[1])
            self.method.nm = self.nm
        initialised = [t for t in self.targets if not t.preinitialised]
        warn_if_sparsity_unused(self.targets, None if method == "dense" else self.sparsity)
        self.method.init_masks(initialised, self.generator)
        check_initialised(initialised, init_mask, self.method)
        self.sparse_init = sparse_init
        self.method.sparse_init = sparse_init   # randomly grown weights use the same scale
        if sparse_init == "fan_in" and init_mask == "random" and self.method.rescales_init:   # trained values are kept as they are
            # SparseLinear already draws its values for its own fan-in (nn/sparse_linear.py)
            for t in self.targets:
                if isinstance(t, MaskedTarget) and not t.preinitialised:
                    rescale_to_active_fan_in(t.param.data, t.mask)
        self._step = 0
        self._updates = 0
        self._due: bool | None = None   # set between before_ and after_optimizer_step
        self.last_update: dict | None = None
        if self.check_masks:
            check_masks_agree(self.targets, 0)   # per-rank seeds show here (static never updates)
        # pruning at init: the first forward's input shape is noted, the masks decided in step 1
        self._first_input = FirstInputShape(model) if self.method.decides_at_first_step else None
        self._arm_capture()
        managed.claim(model, self)
        # hooks come off the model when this engine is closed or garbage-collected
        self._detach = weakref.finalize(self, _detach_targets, list(self.targets))

    def close(self) -> None:
        """Stop managing the model: its hooks come off and another DynamicSparsity may be built
        on it. (Deleting this object does the same.) The model keeps its weights and zeros."""
        self._detach()
        if self._first_input is not None:
            self._first_input.remove()
            self._first_input = None
        managed.release(self.model, self)

    # -- the public surface --------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> bool mask of the parameter's shape (live tensors: do not modify)."""
        return {t.name: t.mask for t in self.targets}

    @property
    def step_count(self) -> int:
        return self._step

    def step(self, scaler: torch.amp.GradScaler | None = None, closure=None) -> None:
        """Optimizer step with masked gradients, masks re-applied, topology update when due.

        Pruning at init (snip, grasp, synflow): the first forward and backward run on the dense
        network; the first ``step()`` decides the masks (zeroing pruned weights, their gradients
        and optimizer state) before the optimizer steps. GraSP needs ``closure``, a function
        recomputing the first batch's loss with its graph: ``dst.step(closure=lambda:
        loss_fn(model(x), y))``; other methods never call it.

        With mixed precision, pass the ``torch.amp.GradScaler``::

            scaler.scale(loss).backward()
            dst.step(scaler)      # unscales, steps through scaler.step, rewires when due
            scaler.update()

        The gradients are unscaled first, so growth scores and the finiteness check see the true
        gradients; a step the scaler skips (inf/NaN found) also skips that topology update.
        """
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        self.before_optimizer_step(closure)
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
        self.after_optimizer_step()

    def before_optimizer_step(self, closure=None) -> None:
        """The part of :meth:`step` before ``optimizer.step()``, for loops that step the optimizer
        themselves (the Trainer and Lightning callbacks in ``regrow.integrations``): decides
        whether this step rewires, keeps the gradients the update reads, masks the gradients.
        Call :meth:`after_optimizer_step` right after the optimizer step."""
        t = self._step + 1
        if t == 1 and self.method.decides_at_first_step:
            self._decide_masks(closure)
        due = self.method.dynamic and self.schedule.is_update(t)
        # only a method that reads gradients is misled by a non-finite one (GMP must not skip)
        if due and self.method.needs_grad and not all(target.grad_is_finite() for target in self.targets):
            warnings.warn(f"regrow: non-finite gradient at step {t}; skipping this topology update",
                          RuntimeWarning, stacklevel=3)
            due = False
        if due and self.method.needs_grad:
            for target in self.targets:
                target.snapshot_grad()
        if self.method.observes_gradients:
            self._observe_gradients(t)
        for target in self.targets if self.method.masked else ():
            target.mask_grad()
        self.method.before_optimizer(self.targets)   # Top-KAST: its backward set joins the step
        self._due = due

    def after_optimizer_step(self) -> None:
        """The part of :meth:`step` after ``optimizer.step()``: masks re-applied, the topology
        updated when due, the step counted."""
        if self._due is None:
            raise RuntimeError("after_optimizer_step() without before_optimizer_step() for this step")
        t, due, self._due = self._step + 1, self._due, None
        self.method.after_optimizer(self.targets)   # Top-KAST: keeps its backward set's new values
        for target in self.targets if self.method.masked else ():
            target.apply_mask()
        if due:
            self._update_topology(t)
        for target in self.targets:
            target.release()
        self._step = t
        self._arm_capture()

    def stats(self) -> dict:
        """Overall density, ITOP rate, update count, step, and per-layer density/nnz/neurons."""
        out = sparsity_stats(self.targets)
        out.update(updates=self._updates, step=self._step, method=self.method.name)
        return out

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (the model and optimizer are saved separately)."""
        return {
            "step": self._step,
            "updates": self._updates,
            "generator": self.generator.get_state(),
            "targets": {t.name: t.state_dict() for t in self.targets},
            "method": self.method.state_dict(),
            "config": {"method": self.method.name, "sparsity": self.sparsity,
                       "distribution": self.distribution, "seed": self.seed},
        }

    def load_state_dict(self, state: dict) -> None:
        names = {t.name for t in self.targets}
        if set(state["targets"]) != names:
            raise ValueError(f"checkpoint layers {sorted(state['targets'])} do not match this model's "
                             f"sparsified layers {sorted(names)}")
        saved = state["config"]
        if self.init_mask == "existing":
            # budgets read from a freshly built model's zeros: the run's are the checkpoint's
            self.sparsity = float(saved["sparsity"])
        # the seed orders tied scores (and future draws come from the restored generator): a
        # different one would resume with other tie-breaks
        for key, mine in (("method", self.method.name), ("sparsity", self.sparsity),
                          ("distribution", self.distribution), ("seed", self.seed)):
            if key in saved and saved[key] != mine:
                raise ValueError(f"checkpoint was made with {key} {saved[key]!r}, not {mine!r}; "
                                 "create DynamicSparsity with the checkpoint's settings")
        # a method training weights outside its mask (Top-KAST's B \ A) owns their optimizer
        # state, which loading the masks zeroes: keep it from the loaded optimizer
        held = ({t.name: [b.clone() for b in per_weight_state(self.optimizer, t.param)] for t in self.targets}
                if self.method.trains_outside_mask else {})
        for t in self.targets:
            t.load_state_dict(state["targets"][t.name])
            if self.init_mask == "existing" and not t.preinitialised:
                t.budget = t.nnz
        self.method.load_state_dict(state["method"])
        for t in self.targets if held else ():
            flat = self.method.trained_outside_mask(t)
            for buf, saved in zip(per_weight_state(self.optimizer, t.param), held[t.name]):
                put_flat(buf, flat.to(buf.device), saved.reshape(-1)[flat.to(saved.device)])
        # the generator is a CPU one; a checkpoint loaded with map_location="cuda" moved its state
        self.generator.set_state(state["generator"].cpu())
        self._step, self._updates = int(state["step"]), int(state["updates"])
        if self._step > 0 and self._first_input is not None:
            self._first_input.remove()   # the checkpoint's masks were decided already
            self._first_input = None
        for t in self.targets:
            t.release()
        self._arm_capture()
        if self.check_masks:
            check_masks_agree(self.targets, self._step)

    # -- internals -----------------------------------------------------------------------
    def _observe_gradients(self, t: int) -> None:
        """Methods that smooth the dense gradient (SNFS's momentum) see it at every step."""
        if not all(target.grad_is_finite() for target in self.targets):
            warnings.warn(f"regrow: non-finite gradient at step {t}; method '{self.method.name}' does not "
                          "add it to its running gradient statistics", RuntimeWarning, stacklevel=4)
            return
        for target in self.targets:
            target.snapshot_grad()
        self.method.observe_gradients(self.targets)

    def _decide_masks(self, closure) -> None:
        """Pruning at init: the method sets every mask from step 1's gradients, input or loss."""
        shape = self._first_input.shape if self._first_input is not None else None
        if self._first_input is not None:
            self._first_input.remove()
            self._first_input = None
        for target in self.targets:
            if not target.grad_is_finite():
                raise ValueError(f"method '{self.method.name}' decides its masks at the first step, but "
                                 f"the gradient of '{target.name}' is not finite there")
            target.snapshot_grad()
        first = FirstStep(model=self.model, input_shape=shape, closure=closure, generator=self.generator)
        self.method.decide_masks(self.targets, first)
        if self.check_masks:
            check_masks_agree(self.targets, 1)

    def _update_topology(self, t: int) -> None:
        ctx = UpdateContext(step=t, fraction=self.schedule.fraction(t), generator=self.generator,
                            seed=self.seed)
        if self.method.needs_activations:
            check_captured(self.targets)   # never a silent fallback to the dense gradient
        with torch.no_grad():
            before = {target.name: target.active_indices().clone() for target in self.targets}
            for target in self.targets:
                if self.method.needs_grad and not target.grad_available():
                    continue   # no gradient reached this layer at this step: nothing to grow by
                self.method.update(target, ctx)
            self.method.after_update(self.targets, ctx)
        self.last_update = {"step": t, "drop_fraction": ctx.fraction, "layers": {
            target.name: rewired_counts(before[target.name], target.active_indices())
            for target in self.targets}}
        self._updates += 1
        if self.check_masks:
            check_masks_agree(self.targets, t)

    def _arm_capture(self) -> None:
        """Hook layer inputs/output gradients for the next step if it is an update step."""
        if not (self.method.dynamic and self.schedule.is_update(self._step + 1)):
            return
        for target in self.targets:
            if self.method.needs_activations or (self.method.needs_grad and target.grad_needs_capture):
                target.arm_capture()

    def __repr__(self) -> str:
        s = self.stats()
        return (f"DynamicSparsity(method={self.method.name}, sparsity={self.sparsity}, "
                f"layers={len(self.targets)}, density={s['density']:.4f}, step={self._step})")


