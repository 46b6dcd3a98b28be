"""Everything a run is built from: data, model, optimizer, LR schedule, sparsity engine, FLOPs.

Each builder is a pure function of the configuration (and the seed in it), so a resumed run
rebuilds the same objects and then loads their states from the checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..engine import DynamicSparsity
from ..nn.sparsify import sparsify
from . import ddp
from .config import TrainConfig
from .flops import TrainFlops, growth_cost, measure_layer_flops


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation that depends only on (seed, epoch).

    A DistributedSampler-style shard would take ``order[rank::world_size]`` of it.
    """
    gen = torch.Generator().manual_seed(1_000_003 * int(seed) + int(epoch) + 1)
    return torch.randperm(n, generator=gen)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer '{config.optimizer}'")


def lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """LR multiplier as a pure function of the number of steps taken (so resume is exact)."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    milestones = config.lr_steps or [0.5 * config.epochs, 0.75 * config.epochs]
    milestone_steps = sorted(round(m * steps_per_epoch) for m in milestones)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "cosine":
            span = max(total - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
        if config.lr_schedule == "step":
            return config.lr_gamma ** sum(step >= m for m in milestone_steps)
        return 1.0
    return factor


def build_model(config: TrainConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The run's network, seeded, and converted to always-sparse layers for ``backend=sparse``."""
    from ..models import build
    torch.manual_seed(config.seed)
    model = build(config.model, num_classes, in_shape, **config.model_kwargs())
    if config.backend == "sparse":
        # sparsify keeps whole modules dense; accept parameter names as DynamicSparsity does
        dense = [name.removesuffix(".weight") for name in config.dense_layers]
        model = sparsify(model, sparsity=config.sparsity, distribution=config.distribution,
                         seed=config.seed, dense_layers=dense)
    return model


def make_sparsity(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                  total_steps: int) -> DynamicSparsity:
    return DynamicSparsity(
        model, optimizer, method=config.method, sparsity=config.sparsity, total_steps=total_steps,
        distribution=config.distribution, update_interval=config.update_interval,
        drop_fraction=config.drop_fraction, drop_schedule=config.drop_schedule,
        stop_fraction=config.stop_fraction, dense_layers=config.dense_layers, seed=config.seed,
        sparse_init=None if config.sparse_init == "none" else config.sparse_init, nm=config.nm,
        init_mask=config.init_mask,
        **config.method_options(strict=True))


@dataclass
class Run:
    """One run's objects, built from its configuration (see :func:`build_run`)."""

    config: TrainConfig
    group: ddp.Group
    data: object                       # regrow.data.DatasetSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    dst: DynamicSparsity
    flops: TrainFlops
    growth: str                        # what an update step's growth costs (see flops.growth_cost)
    loss_fn: nn.Module
    steps_per_epoch: int

    @property
    def n_train(self) -> int:
        return len(self.data.train)

    def load_state(self, state: dict) -> None:
        """Restore model, optimizer, LR schedule, engine and FLOPs counters from a checkpoint."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.dst.load_state_dict(state["dst"])
        self.flops.load_state_dict(state["flops"])


def build_run(config: TrainConfig, group: ddp.Group) -> Run:
    """Load the data and build every object of the run (on ``group.device``)."""
    from ..data import load
    data = load(config.dataset, config.data_dir, val_fraction=config.val_fraction,
                augment=config.augment, seed=config.seed)
    model = build_model(config, data.in_shape, data.num_classes).to(group.device)   # cpu but for torchrun on GPUs
    if config.init_weights is not None:   # e.g. imp's rewound survivors, before the engine reads their zeros
        model.load_state_dict(torch.load(config.init_weights, map_location=group.device, weights_only=True))
    optimizer = make_optimizer(config, model)
    steps_per_epoch = ddp.steps_per_epoch(len(data.train), config.batch_size, group)   # ceil(n / batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps_per_epoch))
    dst = make_sparsity(config, model, optimizer, config.epochs * steps_per_epoch)
    return Run(config=config, group=group, data=data, model=model, optimizer=optimizer,
               scheduler=scheduler, dst=dst, flops=TrainFlops(measure_layer_flops(model, data.in_shape)),
               growth=growth_cost(dst.method),
               loss_fn=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
               steps_per_epoch=steps_per_epoch)
