"""Rank-consistent topology under torch.distributed.

Decisions are identical on every rank by construction: growth reads gradients that DDP has
already all-reduced, random choices come from a generator seeded the same on every rank, and
ties break by index (regrow.selection). What DDP does *not* all-reduce is made global here:
the layer inputs and output gradients that GSE's GraBo/GraEst samplers turn into marginals
(:func:`all_reduce_sum`, :func:`global_rows`, called by regrow.sampling) and the subset
gradients the always-sparse backend computes from them (:func:`all_reduce_mean`, called by
regrow.backends.sparse). This module also adds the cheap proof: after each topology update, a
per-layer checksum of the active indices is all-reduced (min and max) and any disagreement
raises, naming the first layer that diverged.

Outside a process group of two or more ranks no collective runs: the reductions return their
inputs and the check returns at once, so callers need no ``if distributed`` of their own.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .target import SparseTarget


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


# splitmix64's finaliser constants, as int64 (torch's int64 arithmetic wraps like uint64's)
_M1, _M2, _GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)


class MaskDivergenceError(RuntimeError):
    """Raised when ranks hold different masks after a topology update."""


def is_distributed() -> bool:
    """True inside an initialised process group of two or more ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where tensors must live for this process group's collectives (nccl: the current GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or DataParallel) and inside ``torch.compile``'s
    wrapper; any other model as is.

    Sparsify the unwrapped model so that parameter names, masks and checkpoints are the same
    with and without DDP or compilation (no ``module.`` or ``_orig_mod.`` prefix).
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):   # torch.compile(model)
            model = model._orig_mod
        else:
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

    Rows are numbered as if the ranks' local batches were concatenated in rank order. A
    per-sample random draw (GraEst's sign vector) made over ``total`` rows from the shared
    generator and sliced at ``offset`` consumes the generator identically on every rank, even
    when local batch sizes differ; it has the distribution of a single process's draw however
    the batch was sharded, and is exactly that draw when the shards are contiguous.
    One process: ``(0, local_rows)``.
    """
    if not is_distributed():
        return 0, int(local_rows)
    sizes = [torch.zeros(1, dtype=torch.int64, device=comm_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([int(local_rows)], dtype=torch.int64, device=comm_device()))
    counts = [int(s) for s in sizes]
    me = dist.get_rank()
    return sum(counts[:me]), sum(counts)


# -- the proof ---------------------------------------------------------------------------------
def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's bijective finaliser: nearby indices get unrelated 64-bit hashes."""
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def mask_checksums(targets: Sequence[SparseTarget]) -> torch.Tensor:
    """One int64 per layer: the wrapping sum of mixed active flat indices, mixed with the count.

    A sum keeps it O(N) and independent of index order; the non-linear mixing is what makes
    structured differences visible (with a linear hash, moving one connection up by one and
    another down by one would cancel out).
    """
    sums = []
    for t in targets:
        idx = t.active_indices().to(torch.int64)
        total = int(_mix64(idx + _GOLDEN).sum())
        sums.append(_signed((total ^ (t.nnz * _GOLDEN)) & 0xFFFFFFFFFFFFFFFF))
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
