"""The prune-and-grow step every dynamic method shares; a method supplies only its scores.

At an update step with drop fraction alpha, a layer with N active connections drops the
k = floor(alpha * N) active weights of smallest |w| (ties to the lower index) and grows k
connections chosen by the method among those inactive *before* the update, so dropped and
grown sets are disjoint and N never changes.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch

from ..core import nm as nm_structure
from ..core.target import SparseTarget
from ..core.selection import largest_k, smallest_k, tie_keys

GROW_INITS = ("zero", "random")
REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: makes a method available as ``method=cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def option_names(cls: type["Method"]) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


@dataclass(frozen=True)
class FirstStep:
    """What a method that decides its masks at the first ``step()`` can read (pruning at init).

    ``model``: the network (dense until the decision); ``input_shape``: shape of the first
    forward's input (None if no forward was seen); ``closure``: the ``closure`` passed to that
    ``step()``, recomputing the first batch's loss with its graph (None when not given).
    """

    model: "torch.nn.Module"
    input_shape: tuple | None
    closure: "Callable[[], torch.Tensor] | None"
    generator: torch.Generator


@dataclass(frozen=True)
class UpdateContext:
    """What an update step knows besides the layer: 1-based step, drop fraction, RNG, seed."""

    step: int
    fraction: float
    generator: torch.Generator
    seed: int = 0

    def ties(self, target: SparseTarget, positions: torch.Tensor) -> torch.Tensor:
        """Tie-break keys of flat ``positions`` in ``target`` at this update (see core.selection):
        the same on every rank and in both backends, so equal scores are not settled by index.
        The layer is named by its module (``fc.weight`` and SparseLinear's ``fc.values`` agree)."""
        return tie_keys(positions, self.seed, self.step, target.name.rsplit(".", 1)[0])


def random_mask(target: SparseTarget, count: int, gen: torch.Generator) -> torch.Tensor:
    """A bool [rows, cols] mask with exactly ``count`` entries, uniformly placed."""
    flat = torch.randperm(target.numel, generator=gen)[:count]
    mask = torch.zeros(target.numel, dtype=torch.bool)
    mask[flat] = True
    return mask.view(target.rows, target.cols)


class Method:
    """Base class. Subclasses set ``name`` and override the hooks they need."""

    name: ClassVar[str] = ""
    dynamic: ClassVar[bool] = True       # rewires connections during training
    needs_grad: ClassVar[bool] = False   # reads dL/dw at update steps
    masked: ClassVar[bool] = True        # False: every weight stays active, nothing to mask
    sparse_backend: ClassVar[bool] = True  # works without dense tensors
    #: set by the engine: "fan_in" makes randomly grown weights use their neuron's fan-in scale
    sparse_init: str | None = None
    sparse_backend_refusal: ClassVar[str] = "needs dense weights, which always-sparse layers never hold"
    #: pruning at initialisation: the engine calls decide_masks inside the first step()
    decides_at_first_step: ClassVar[bool] = False
    #: the engine calls observe_gradients with every step's (unmasked) gradients
    observes_gradients: ClassVar[bool] = False
    #: whether DynamicSparsity(..., nm="N:M") works with this method
    supports_nm: ClassVar[bool] = True
    #: False: the engine's sparse_init leaves the initial values alone (Top-KAST keeps dense ones)
    rescales_init: ClassVar[bool] = True
    #: True: the optimizer also steps weights outside the mask (trained_outside_mask), whose
    #: optimizer state a checkpoint load must keep
    trains_outside_mask: ClassVar[bool] = False
    #: set by the engine: (N, M) when every group of M consecutive inputs holds exactly N
    nm: tuple[int, int] | None = None

    def __init__(self, *, grow_init: str = "zero"):
        if grow_init not in GROW_INITS:
            raise ValueError(f"unknown grow_init '{grow_init}'; choose one of {', '.join(GROW_INITS)}")
        self.grow_init = grow_init

    @property
    def needs_activations(self) -> bool:
        """Whether the update step's layer inputs and output gradients are captured."""
        return False

    def plan(self, schedule) -> None:
        """Called once with the engine's UpdateSchedule before the masks are initialised."""

    def attach(self, targets: Sequence[SparseTarget]) -> None:
        """Called once with every target, always-sparse ones included, before ``init_masks``
        (which sees only the targets whose topology the engine initialises)."""

    # -- initial topology ----------------------------------------------------------------
    #: set by the engine (its ``init_mask``): "random", "magnitude" or "existing"
    init_mask: str = "random"

    def init_masks(self, targets: Sequence[SparseTarget], gen: torch.Generator) -> None:
        """Masks with each layer's exact budget: random (a fixed random sparse network), or the
        budget's largest entries of :meth:`init_priority` for ``init_mask`` magnitude/existing."""
        for t in targets:
            if self.nm is not None:   # N per group: the random or the init_mask priority within groups
                priority = (torch.rand(t.numel, generator=gen) if self.init_mask == "random"
                            else self.init_priority(t).reshape(-1).float().cpu())
                t.set_mask(nm_structure.keep_top_per_group(t, priority, *self.nm))
            elif self.init_mask == "random":
                t.set_mask(random_mask(t, t.budget, gen))
            else:
                keep = largest_k(self.init_priority(t).reshape(-1), t.budget)
                mask = torch.zeros(t.numel, dtype=torch.bool, device=keep.device)
                mask[keep] = True
                t.set_mask(mask.view(t.rows, t.cols))

    def init_priority(self, target: SparseTarget) -> torch.Tensor:
        """``[rows, cols]`` scores a non-random initial mask keeps the largest of: |w| for
        "magnitude", w != 0 for "existing" (read before any mask is set: every entry active)."""
        values = target.active_values()
        if values.numel() != target.numel:
            raise ValueError(f"'{target.name}' already has a mask; init_mask={self.init_mask!r} reads the "
                             "weights of an unmasked layer")
        w = values.reshape(target.rows, target.cols)
        return w.abs() if self.init_mask == "magnitude" else (w != 0).to(w.dtype)

    def observe_gradients(self, targets: Sequence[SparseTarget]) -> None:
        """Every step, before the gradients are masked (``target.dense_grad()``; a layer
        without a gradient this step has ``grad_available()`` False)."""

    def trained_outside_mask(self, target: SparseTarget) -> torch.Tensor:
        """Flat indices outside the mask whose optimizer state the method keeps (with
        ``trains_outside_mask``; restored after a checkpoint load zeroed it)."""
        return torch.empty(0, dtype=torch.long)

    def before_optimizer(self, targets: Sequence[SparseTarget]) -> None:
        """Every step, after the gradients were masked, right before ``optimizer.step()``."""

    def after_optimizer(self, targets: Sequence[SparseTarget]) -> None:
        """Every step, right after ``optimizer.step()``, before the masks are re-applied."""

    def decide_masks(self, targets: Sequence[SparseTarget], first: FirstStep) -> None:
        """Pruning at init: set every mask from the first step (gradients are snapshotted)."""
        raise NotImplementedError(f"method '{self.name}' does not decide masks at the first step")

    # -- one topology update -------------------------------------------------------------
    @staticmethod
    def rewire_count(target: SparseTarget, ctx: UpdateContext) -> int:
        """k = floor(alpha_t * N), at most the number of inactive connections."""
        n = target.nnz
        return min(int(ctx.fraction * n), target.numel - n)

    def update(self, target: SparseTarget, ctx: UpdateContext) -> None:
        k = self.rewire_count(target, ctx)
        if k <= 0:
            return
        drop = self.drop(target, k, ctx)
        if self.nm is not None:   # each group regrows what it lost, by the method's grow score
            n, m = self.nm
            drop = nm_structure.cap_per_group(target, drop, m, m - n)
            k = drop.numel()
            grow = nm_structure.grow_within_groups(
                target, drop, m, lambda c: self.nm_grow_scores(target, c, ctx), lambda c: ctx.ties(target, c))
        else:
            grow = self.grow(target, k, ctx)
        assert grow.numel() == k, f"{self.name} grew {grow.numel()} of {k} in '{target.name}'"
        # drop is a subset of the active set, so inactive growth is disjoint from it (O(k))
        assert not target.is_active(grow).any(), "dropped and grown sets must be disjoint"
        target.rewire(drop, grow, self.grow_values(target, k, ctx.generator, grow))

    def after_update(self, targets: Sequence[SparseTarget], ctx: UpdateContext) -> None:
        """Called once after every layer was updated (bookkeeping such as DST-EE's counts)."""

    def drop(self, target: SparseTarget, k: int, ctx: UpdateContext | None = None) -> torch.Tensor:
        """The k active connections of smallest |w| (ties by ``ctx.ties``, else lowest index)."""
        active = target.active_indices()
        keys = None if ctx is None else ctx.ties(target, active)
        return active[smallest_k(target.active_values().abs(), k, tie_keys=keys)]

    def grow(self, target: SparseTarget, k: int, ctx: UpdateContext) -> torch.Tensor:
        """The k candidates with the largest grow score, ties by the seeded hash ``ctx.ties``."""
        candidates = self.candidates(target, k, ctx)
        scores = self.grow_scores(target, candidates, ctx)
        return candidates[largest_k(scores, k, tie_keys=ctx.ties(target, candidates))]

    def nm_grow_scores(self, target: SparseTarget, candidates: torch.Tensor,
                       ctx: UpdateContext) -> torch.Tensor:
        """Scores ranking growth inside N:M groups: ``grow_scores`` when the method has one,
        else uniform random (methods that grow at random)."""
        if type(self).grow_scores is not Method.grow_scores:
            return self.grow_scores(target, candidates, ctx)
        return torch.rand(candidates.numel(), dtype=torch.float64, generator=ctx.generator).to(candidates.device)

    def candidates(self, target: SparseTarget, k: int, ctx: UpdateContext) -> torch.Tensor:
        """Connections eligible to grow: by default every inactive one."""
        return target.inactive_indices()

    def grow_scores(self, target: SparseTarget, candidates: torch.Tensor,
                    ctx: UpdateContext) -> torch.Tensor:
        raise NotImplementedError(f"method '{self.name}' does not score growth")

    def grow_values(self, target: SparseTarget, k: int, gen: torch.Generator,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
        """Initial values of grown weights: zero, or U(-b, b) with the layer's init bound.

        With the engine's ``sparse_init="fan_in"`` and the grown flat ``positions`` given, b is
        1/sqrt(active fan-in of the weight's row) (its neuron's count before the update), the
        scale the initial weights were given; SparseLinear's bound already is its fan-in's.
        """
        if self.grow_init == "zero":
            return torch.zeros(k, device=target.device)
        u = torch.rand(k, generator=gen) * 2 - 1
        if self.sparse_init == "fan_in" and positions is not None and not target.preinitialised:
            rows = torch.div(positions.cpu(), target.cols, rounding_mode="floor")
            counts = target.row_counts().cpu()[rows].clamp(min=1).to(u.dtype)
            return (u / counts.sqrt()).to(target.device)
        return (u * target.fan_in_bound()).to(target.device)

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_method(name: str, options: dict) -> Method:
    """Instantiate a registered method, turning bad options into a one-line ValueError."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method '{name}'; choose one of {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    allowed = option_names(cls)
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"method '{name}' has no option(s) {bad}; its options are {allowed or 'none'}")
    return cls(**options)
