"""Data-parallel training under torchrun: what ``regrow train`` needs besides the engine.

``torchrun --nproc_per_node N -m regrow train ...`` starts N copies of the command; each joins
the process group described by torchrun's environment (:func:`process_group_from_env`),
trains the same model wrapped in DistributedDataParallel (:func:`wrap`) on its own shard of
every batch (:func:`epoch_batches`), and only rank 0 writes files.

``--batch-size`` stays the *global* batch: each of N ranks takes ``batch_size / N`` rows of it.
The global batches are the ones one process would take, so a run's steps and schedules do not
depend on N, and when N divides the training set size its masks and weights do not either (up
to floating-point summation order). Otherwise the sampler pads each epoch's last batch with up
to N - 1 repeated samples, so runs agree closely but not exactly.

Backend: nccl when the ranks train on GPUs, gloo on CPU, chosen from the device.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from ..core.distributed import all_reduce_sum


@dataclass(frozen=True)
class Group:
    """Where this process stands in the run: its rank, the number of ranks, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, checkpoints and the summary."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group of two or more ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def choose_backend(device: torch.device) -> str:
    """nccl for GPU training (when built in), gloo otherwise."""
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


def current_group(device: torch.device | str | None = None) -> Group:
    """The group this process already belongs to (one process of one if none).

    Raises:
        ValueError: torchrun started this process but it joined no process group: every
            rank would train alone and they would all write the same files.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if launched_by_torchrun():
            raise ValueError(
                f"regrow: started by torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}) but no process group was "
                "joined; `regrow train` joins it (in Python: regrow.ddp_train.init_from_env()), while "
                "`regrow compare` and `regrow demo` run in one process only")
        return Group(device=torch.device(device or "cpu"))
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Group(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                 device=torch.device(device), backend=backend)


def init_from_env(device: torch.device | str | None = None) -> Group:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); outside torchrun, a group of one and nothing is initialised.

    Args:
        device: where this rank trains. Default: ``cuda:LOCAL_RANK`` when GPUs are visible
            and ``REGROW_DEVICE`` is not ``cpu``, else the CPU. The backend follows it.
    """
    if dist.is_available() and dist.is_initialized():
        return current_group(device)
    if not launched_by_torchrun():
        return Group(device=torch.device(device or "cpu"))
    if not dist.is_available():
        raise RuntimeError("regrow: launched with WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        gpu = torch.cuda.is_available() and os.environ.get("REGROW_DEVICE", "").lower() != "cpu"
        device = torch.device("cuda", local % torch.cuda.device_count()) if gpu else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = choose_backend(device)
    dist.init_process_group(backend)   # env:// rendezvous from torchrun's variables
    return Group(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                 device=device, backend=backend)


@contextmanager
def process_group_from_env(device: torch.device | str | None = None) -> Iterator[Group]:
    """:func:`init_from_env` for the duration of a block; destroys the group it created."""
    created = not (dist.is_available() and dist.is_initialized()) and launched_by_torchrun()
    group = init_from_env(device)
    try:
        yield group
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def wrap(model: nn.Module, group: Group) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks, else itself.

    Sparsify ``model`` itself (not the wrapper) so that names and checkpoints match a
    single-process run; forward through the returned module so that gradients are all-reduced.
    """
    if not group.distributed:
        return model
    ddp = nn.parallel.DistributedDataParallel
    # An always-sparse layer's index buffers are its topology: rewired identically on every
    # rank by the engine (and verified by checksum), replaced as new tensors at each rewire.
    # DDP would broadcast them from rank 0 at every forward: wasted traffic of 2 x N ints.
    topology = [f"{name}.{buf}" for name, m in model.named_modules() if hasattr(m, "regrow_sparse_parameter")
                for buf, _ in m.named_buffers(recurse=False)]
    if topology and hasattr(ddp, "_set_params_and_buffers_to_ignore_for_model"):
        ddp._set_params_and_buffers_to_ignore_for_model(model, topology)
    if group.device.type == "cuda":
        return ddp(model, device_ids=[group.device.index])
    return ddp(model)


def check_batch_size(batch_size: int, group: Group) -> int:
    """Each rank's share of the global batch (the batch must split evenly)."""
    if batch_size % group.world_size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes "
                         f"({group.world_size}): it is the global batch, split evenly across ranks")
    return batch_size // group.world_size


def sampler_seed(seed: int) -> int:
    """DistributedSampler seeds its epoch permutation with ``seed + epoch``; this makes that
    generator the one :func:`regrow.train.epoch_order` uses, so one rank sees exactly the
    single-process order."""
    return 1_000_003 * int(seed) + 1


def steps_per_epoch(n: int, batch_size: int, group: Group) -> int:
    """Optimizer steps per epoch: ``ceil(n / batch_size)`` for any number of ranks."""
    local = check_batch_size(batch_size, group)
    return math.ceil(math.ceil(n / group.world_size) / local)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, group: Group) -> list[torch.Tensor]:
    """This rank's index batches for ``epoch``, from a seeded DistributedSampler.

    Batch ``j`` of every rank together is rows ``[j * batch_size, (j + 1) * batch_size)`` of the
    epoch's permutation (the sampler deals the permutation out round-robin), so the global
    batches are the single-process ones; the permutation is padded by wrapping round so that
    every rank takes the same number of steps.
    """
    sampler = DistributedSampler(range(n), num_replicas=group.world_size, rank=group.rank,
                                 shuffle=True, seed=sampler_seed(seed), drop_last=False)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(iter(sampler)), dtype=torch.long)
    return list(order.split(check_batch_size(batch_size, group)))


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Python numbers summed over all ranks (one collective; identity in one process)."""
    if not values:
        return ()
    (total,) = all_reduce_sum(torch.tensor(values, dtype=torch.float64))
    return tuple(float(v) for v in total)
