"""What the framework callbacks share: building the engine (fresh or from a checkpoint) and
the values they log."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..engine import DynamicSparsity

LOG_PREFIX = "regrow/"


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, options: dict,
                 saved: dict | None = None) -> DynamicSparsity:
    """A DynamicSparsity over ``model``; with ``saved`` (its ``state_dict()``), the engine of a run
    resumed by its framework, whose weights and optimizer state were already restored.

    Building an engine sets fresh masks and rescales the surviving weights (``sparse_init``), so
    on resume the restored weights and optimizer state are kept aside and put back once the
    checkpoint's masks are loaded: the run continues exactly where it stopped.
    """
    if total_steps is None or total_steps <= 0:
        raise ValueError(f"regrow needs the run's number of optimizer steps; the framework reports {total_steps}")
    if saved is None:
        return DynamicSparsity(model, optimizer, total_steps=total_steps, **options)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    dst = DynamicSparsity(model, optimizer, total_steps=total_steps, **options)
    model.load_state_dict(weights)
    optimizer.load_state_dict(optimizer_state)
    dst.load_state_dict(saved)
    return dst


def log_values(dst: DynamicSparsity) -> dict[str, float]:
    """Density, ITOP rate and number of topology updates so far, under ``regrow/`` names."""
    stats = dst.stats()
    return {f"{LOG_PREFIX}density": float(stats["density"]),
            f"{LOG_PREFIX}itop_rate": float(stats["itop_rate"]),
            f"{LOG_PREFIX}updates": float(stats["updates"])}

