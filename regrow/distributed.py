"""Rank-consistent topology under torch.distributed.

Decisions are identical on every rank by construction: growth reads gradients that DDP has
already all-reduced, random choices come from a generator seeded the same on every rank, and
ties break by index (regrow.selection). Two inputs are *not* all-reduced by DDP and are made
global here: the layer inputs and output gradients that GSE's GraBo/GraEst samplers turn into
marginals (:func:`all_reduce_sum`, :func:`global_rows`). This module also adds the cheap proof:
after each topology update, a per-layer checksum of the active indices is all-reduced (min and
max) and any disagreement raises, naming the first layer that diverged.

In one process every function here is a no-op (or the identity), so the engine calls them
unconditionally.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .backends.base import SparseTarget

_MIX = 0x9E3779B97F4A7C15 & 0x7FFFFFFFFFFFFFFF   # odd constant: spreads indices over int64


class MaskDivergenceError(RuntimeError):
    """Raised when ranks hold different masks after a topology update."""


def is_distributed() -> bool:
    """True inside an initialised process group of two or more ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def comm_device() -> torch.device:
    """Where tensors must live for this process group's collectives (nccl: the current GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or DataParallel); any other model as is.

    Sparsify the unwrapped model so that parameter names, masks and checkpoints are the same
    with and without DDP (no ``module.`` prefix).
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


# -- making per-rank statistics global ---------------------------------------------------------
def all_reduce_sum(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Element-wise sums over all ranks, each returned with its input's shape, dtype and device.

    One collective for all tensors (they are packed into one float64 buffer, which also keeps
    the sum exact enough to be a sampling distribution whatever the inputs' dtype). Every rank
    receives bit-identical results, so anything derived from them is rank-identical.
    In one process the inputs are returned unchanged.
    """
    if not is_distributed():
        return tuple(tensors)
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).to(comm_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, start = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[start:start + n].view(t.shape).to(device=t.device, dtype=t.dtype))
        start += n
    return tuple(out)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks, as DDP averages parameter gradients (identity in one process).

    For gradients a backend computes itself from this rank's captured inputs and output
    gradients (the always-sparse backend's subset gradients): averaged, they are the
    gradient of the global batch, exactly what DDP makes of ``p.grad``.
    """
    if not is_distributed():
        return tensor
    (total,) = all_reduce_sum(tensor)
    return total / dist.get_world_size()


def global_rows(local_rows: int) -> tuple[int, int]:
    """``(offset, total)``: where this rank's ``local_rows`` rows sit in the global batch.

    The global batch is the ranks' local batches concatenated in rank order, which is how a
    DistributedSampler without shuffling shards it. A per-sample random draw (GraEst's sign
    vector) made over ``total`` rows from the shared generator and sliced at ``offset`` is then
    the same draw a single process would make over the whole batch, and every rank consumes the
    generator identically even if the local batch sizes differ. One process: ``(0, local_rows)``.
    """
    if not is_distributed():
        return 0, int(local_rows)
    sizes = [torch.zeros(1, dtype=torch.int64, device=comm_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([int(local_rows)], dtype=torch.int64, device=comm_device()))
    counts = [int(s) for s in sizes]
    me = dist.get_rank()
    return sum(counts[:me]), sum(counts)


# -- the proof ---------------------------------------------------------------------------------
def mask_checksums(targets: Sequence[SparseTarget]) -> torch.Tensor:
    """One int64 per layer: a wrapping sum of hashed active flat indices, plus the count."""
    sums = []
    for t in targets:
        idx = t.active_indices().to(torch.int64)
        hashed = (idx + 1) * _MIX   # int64 arithmetic wraps identically on every rank
        sums.append(int(hashed.sum()) ^ (t.nnz << 1))
    return torch.tensor(sums, dtype=torch.int64)


def mask_checksum(targets: Sequence[SparseTarget]) -> str:
    """One hex digest of every layer's topology (for logs and run summaries)."""
    total = 0
    for i, value in enumerate(mask_checksums(targets).tolist()):
        # position-dependent mixing: swapping two layers' masks changes the digest
        total = (total * 1_000_003 + (value & 0xFFFFFFFFFFFFFFFF) + i) & 0xFFFFFFFFFFFFFFFF
    return f"{total:016x}"


def check_masks_agree(targets: Sequence[SparseTarget], step: int) -> None:
    """All-reduce the mask checksums; raise MaskDivergenceError if any rank differs."""
    if not is_distributed():
        return
    local = mask_checksums(targets).to(comm_device())
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    differs = (lo != hi).cpu()
    if bool(differs.any()):
        first = targets[int(differs.nonzero()[0])].name
        raise MaskDivergenceError(
            f"regrow: masks diverged across ranks at step {step}, first in layer '{first}'; "
            "every rank must use the same seed and all-reduced gradients (wrap the model in DDP)")
