"""The training loop behind ``regrow train``: one run, checkpointed, resumable bit for bit.

A run directory holds
- ``config.yaml``: the resolved :class:`~regrow.config.TrainConfig`;
- ``checkpoint.pt``: model, optimizer, LR scheduler, DST state (masks, counters, RNG), the
  global RNGs (the CPU's, and every GPU's when CUDA is available), the epoch and the batch
  reached inside it, the metric history (written at every epoch end and every
  ``checkpoint_every`` steps, atomically);
- ``metrics.jsonl``: one line per finished epoch;
- ``summary.json``: written only once the run has finished (tools skip finished runs by it).

Exact resume: the data order of epoch e is a permutation drawn from a generator seeded by
(seed, e), so a resumed run rebuilds it and skips the batches already consumed; every other
random stream (global torch RNG for dropout, the DST generator) is restored from the
checkpoint. Under torchrun (see regrow.ddp_train) a seeded DistributedSampler deals that same
permutation out to the ranks, so the global batches are the single-process ones, the model is
wrapped in DDP, and only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__, ddp_train
from .checkpoint import CHECKPOINT_NAME, checkpoint_path, load_checkpoint, save_checkpoint
from .config import TrainConfig, describe_differences, from_dict, save_yaml
from .distributed import mask_checksum
from .engine import DynamicSparsity
from .flops import TrainFlops, growth_cost, gse_subset_fraction, measure_layer_flops
from .nn.sparsify import sparsify

SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"


# -- building blocks ------------------------------------------------------------------------
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
    from .models import build
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
        **config.method_options(strict=True))


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int) -> tuple[float, float]:
    """(accuracy in 0..1, mean cross-entropy) of ``model`` on ``dataset``."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum, n = 0, 0.0, len(dataset)
    for start in range(0, n, batch_size):
        x, y = dataset.get_batch(torch.arange(start, min(start + batch_size, n)))
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train()
    return correct / max(n, 1), loss_sum / max(n, 1)


def _densities(dst: DynamicSparsity) -> dict[str, float]:
    return {t.name: t.nnz / t.numel for t in dst.targets}


def _nnz(dst: DynamicSparsity) -> dict[str, tuple[int, int]]:
    return {t.name: (t.nnz, t.numel) for t in dst.targets}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _write_metrics(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, path)


def read_summary(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / SUMMARY_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _progress(iterable=None, **kwargs):
    from tqdm.auto import tqdm
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


@dataclass
class _Epoch:
    """Running sums of the epoch in progress (saved in mid-epoch checkpoints)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def state(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "seconds": self.seconds}


# -- the run --------------------------------------------------------------------------------
def train(config: TrainConfig | None, out_dir: str | Path, *, resume: bool = False,
          progress: bool = False, log: Callable[[str], None] | None = None,
          progress_position: int = 0, is_main_process: bool = True,
          stop_after_steps: int | None = None) -> dict | None:
    """Train one run into ``out_dir`` and return its summary.

    Args:
        config: the run; with ``resume`` it may be None (taken from the checkpoint) and if
            given must match the checkpoint's (``threads`` aside).
        out_dir: the run directory. A fresh run refuses a directory that already holds one.
        resume: continue the interrupted run in ``out_dir`` from its checkpoint.
        progress: show tqdm bars (epochs and steps).
        log: called with one line per finished epoch.
        progress_position: tqdm position of the outer bar (compare draws a bar above it).
        is_main_process: only the main process writes files (for data-parallel training).
        stop_after_steps: stop after this global step without writing anything more, as if
            the process were killed there (to test resuming); returns None.

    Raises:
        ValueError / FileNotFoundError: bad configuration, data or run directory.
    """
    out = Path(out_dir)
    # under torchrun (regrow.cli joined the process group): rank 0 alone writes and reports
    group = ddp_train.current_group()
    is_main_process = is_main_process and group.is_main
    progress, log = progress and is_main_process, log if is_main_process else None
    state = None
    if resume:
        if read_summary(out) is not None:
            raise ValueError(f"run in {out} already finished ({SUMMARY_NAME} exists); nothing to resume")
        state = load_checkpoint(checkpoint_path(out))
        saved = from_dict(state["config"])
        if config is not None:
            diff = describe_differences(saved, config)
            if diff:
                raise ValueError(f"--resume uses the run's own configuration; it differs in {', '.join(diff)}")
            saved = saved.replace(threads=config.threads)
        config = saved
    else:
        if config is None:
            raise ValueError("train() needs a config unless resuming")
        if (out / SUMMARY_NAME).exists() or (out / CHECKPOINT_NAME).exists():
            raise ValueError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)

    from .data import load
    data = load(config.dataset, config.data_dir, val_fraction=config.val_fraction,
                augment=config.augment, seed=config.seed)
    model = build_model(config, data.in_shape, data.num_classes).to(group.device)   # cpu but for torchrun on GPUs
    optimizer = make_optimizer(config, model)
    n_train = len(data.train)
    steps_per_epoch = ddp_train.steps_per_epoch(n_train, config.batch_size, group)   # ceil(n / batch)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps_per_epoch))
    dst = make_sparsity(config, model, optimizer, total_steps)
    flops = TrainFlops(measure_layer_flops(model, data.in_shape))
    growth = growth_cost(dst.method)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    start_epoch, start_batch, history, wall_before = 0, 0, [], 0.0
    running = _Epoch()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        dst.load_state_dict(state["dst"])
        flops.load_state_dict(state["flops"])
        _set_rng_states(state)
        start_epoch, start_batch = int(state["epoch"]), int(state["batch"])
        history, wall_before = list(state["history"]), float(state["wall_seconds"])
        # the checkpoint holds the sums over all ranks: one rank carries them on
        running = _Epoch(**state["running"]) if group.is_main else _Epoch(seconds=state["running"]["seconds"])
    elif is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(config, out / CONFIG_NAME)
    if is_main_process:
        _write_metrics(out / METRICS_NAME, history)

    session_start = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - session_start

    def checkpoint(epoch: int, batch: int) -> None:
        totals = _over_ranks(running, group)   # a collective: every rank gets here
        if not is_main_process:
            return
        save_checkpoint({
            "config": config.to_dict(), "epoch": epoch, "batch": batch, "step": dst.step_count,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "dst": dst.state_dict(),
            "flops": flops.state_dict(), "history": history, **_rng_states(),
            "running": totals.state(), "wall_seconds": wall(),
            "masks": _masks(dst), "in_shape": list(data.in_shape), "num_classes": data.num_classes,
        }, out / CHECKPOINT_NAME)

    # DDP all-reduces gradients; DynamicSparsity keeps working on the unwrapped model
    net = ddp_train.wrap(model, group)
    densities, counts = _densities(dst), _nnz(dst)
    epochs_bar = _progress(range(start_epoch, config.epochs), desc=f"{config.method} {config.sparsity:g}",
                           initial=start_epoch, total=config.epochs, unit="epoch",
                           disable=not progress, position=progress_position, leave=progress_position == 0)
    model.train()
    for epoch in epochs_bar:
        data.train.set_epoch(epoch)
        # this rank's share of each global batch (one process: epoch_order's batches)
        batches = ddp_train.epoch_batches(n_train, config.batch_size, config.seed, epoch, group)
        first = start_batch if epoch == start_epoch else 0
        if first == 0:
            running = _Epoch()
        steps_bar = _progress(range(first, steps_per_epoch), initial=first, total=steps_per_epoch,
                              desc=f"epoch {epoch + 1}", unit="step", leave=False,
                              disable=not progress, position=progress_position + 1)
        t_epoch = time.perf_counter()
        for b in steps_bar:
            idx = batches[b]
            x, y = data.train.get_batch(idx)
            x, y = x.to(group.device, non_blocking=True), y.to(group.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logits = net(x)
            loss = loss_fn(logits, y)
            loss.backward()

            t_next = dst.step_count + 1
            update = dst.method.dynamic and dst.schedule.is_update(t_next)
            subset = None
            if update and growth == "subset_grad":
                frac = dst.schedule.fraction(t_next)
                subset = {name: gse_subset_fraction(nnz, numel, dst.method.gamma, frac)
                          for name, (nnz, numel) in counts.items()}
            flops.add_step(densities, len(idx) * group.world_size, growth if update else "none", subset)
            dst.step()
            scheduler.step()
            if update:
                densities, counts = _densities(dst), _nnz(dst)

            running.loss_sum += float(loss.detach()) * len(idx)
            running.correct += int((logits.argmax(1) == y).sum())
            running.seen += len(idx)
            if progress:
                steps_bar.set_postfix(loss=f"{running.loss_sum / running.seen:.4f}",
                                      acc=f"{running.correct / running.seen:.3f}",
                                      density=f"{sum(c[0] for c in counts.values()) / max(sum(c[1] for c in counts.values()), 1):.3f}",
                                      refresh=False)
            step = dst.step_count
            if stop_after_steps is not None and step >= stop_after_steps:
                steps_bar.close()
                epochs_bar.close()
                return None
            if config.checkpoint_every and step % config.checkpoint_every == 0 and b + 1 < steps_per_epoch:
                running.seconds += time.perf_counter() - t_epoch
                t_epoch = time.perf_counter()
                checkpoint(epoch, b + 1)
        steps_bar.close()
        running.seconds += time.perf_counter() - t_epoch
        running = _over_ranks(running, group)

        test_acc, test_loss = evaluate(model, data.test, config.eval_batch_size)
        stats = dst.stats()
        row = {
            "epoch": epoch + 1, "step": dst.step_count,
            "loss": running.loss_sum / max(running.seen, 1),
            "train_accuracy": running.correct / max(running.seen, 1),
            "test_accuracy": test_acc, "test_loss": test_loss,
            "density": stats["density"], "itop_rate": stats["itop_rate"], "updates": stats["updates"],
            "lr": optimizer.param_groups[0]["lr"],
            "train_flops_ratio": flops.end_epoch(),
            "epoch_seconds": running.seconds,
        }
        if data.val is not None:
            row["val_accuracy"], row["val_loss"] = evaluate(model, data.val, config.eval_batch_size)
        history.append(row)
        running = _Epoch()
        if is_main_process:
            _write_metrics(out / METRICS_NAME, history)
        checkpoint(epoch + 1, 0)
        epochs_bar.set_postfix(loss=f"{row['loss']:.4f}", test=f"{test_acc:.4f}",
                               density=f"{row['density']:.3f}")
        if log is not None:
            if progress:   # print above the bars instead of through them
                from tqdm.auto import tqdm
                tqdm.write(_epoch_line(config, row))
            else:
                log(_epoch_line(config, row))
    epochs_bar.close()

    summary = _summary(config, model, dst, flops, history, data, wall())
    summary.update(world_size=group.world_size, mask_checksum=mask_checksum(dst.targets))
    if is_main_process:
        _write_json(out / SUMMARY_NAME, summary)
    return summary


def _rng_states() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The global RNGs that dropout and friends draw from: the CPU one, and every visible GPU's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"rng": torch.get_rng_state(), "cuda_rng": [s.cpu() for s in cuda]}


def _set_rng_states(state: dict) -> None:
    """Restore :func:`_rng_states`; checkpoints without GPU states (CPU runs, older files) load as
    they are, and only the GPUs present now are restored (a run resumed on fewer devices)."""
    torch.set_rng_state(state["rng"])
    cuda = state.get("cuda_rng") or []
    if cuda and torch.cuda.is_available():
        for index, rng in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, index)


def _over_ranks(running: _Epoch, group: ddp_train.Group) -> _Epoch:
    """The epoch's loss/accuracy sums over all ranks (the time is this rank's)."""
    if not group.distributed:
        return running
    loss_sum, correct, seen = ddp_train.sum_over_ranks(running.loss_sum, running.correct, running.seen)
    return _Epoch(loss_sum, int(correct), int(seen), running.seconds)


def _masks(dst: DynamicSparsity) -> dict[str, torch.Tensor]:
    """Final masks for plots and exports (layers whose backend has no dense mask are left out)."""
    out = {}
    for t in dst.targets:
        try:
            out[t.name] = t.mask.detach().cpu().clone()
        except NotImplementedError:
            continue
    return out


def _epoch_line(config: TrainConfig, row: dict) -> str:
    line = (f"epoch {row['epoch']}/{config.epochs}  loss {row['loss']:.4f}  "
            f"train {100 * row['train_accuracy']:.2f}%  test {100 * row['test_accuracy']:.2f}%  ")
    if "val_accuracy" in row:
        line += f"val {100 * row['val_accuracy']:.2f}%  "
    return line + (f"density {row['density']:.4f}  itop {row['itop_rate']:.4f}  lr {row['lr']:.4g}  "
                   f"({row['epoch_seconds']:.1f}s)")


def _summary(config: TrainConfig, model: nn.Module, dst: DynamicSparsity, flops: TrainFlops,
             history: list[dict], data, wall_seconds: float) -> dict:
    stats = dst.stats()
    final_densities = _densities(dst)
    f_dense = flops.layers.dense
    f_sparse = flops.layers.forward(final_densities)
    total_params = sum(p.numel() for p in model.parameters())
    last = history[-1]
    summary = {
        "method": config.method, "sparsity": config.sparsity, "distribution": config.distribution,
        "seed": config.seed, "model": config.model, "dataset": data.name, "epochs": config.epochs,
        "steps": dst.step_count, "batch_size": config.batch_size, "backend": config.backend,
        "test_accuracy": last["test_accuracy"],
        "best_test_accuracy": max(r["test_accuracy"] for r in history),
        "final_density": stats["density"], "itop_rate": stats["itop_rate"], "updates": stats["updates"],
        "train_flops_ratio": flops.ratio, "inference_flops_ratio": f_sparse / f_dense if f_dense else 1.0,
        "dense_forward_flops": f_dense, "sparse_forward_flops": f_sparse, "train_flops": flops.total,
        "wall_seconds": wall_seconds, "seconds_per_step": wall_seconds / max(dst.step_count, 1),
        "final_loss": last["loss"], "final_train_accuracy": last["train_accuracy"],
        "params": {"total": total_params, "sparsified": stats["numel"], "active_sparsified": stats["nnz"],
                   "active": total_params - stats["numel"] + stats["nnz"]},
        "layers": stats["layers"],
        "regrow_version": __version__, "torch_version": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
    }
    if "val_accuracy" in last:
        summary["val_accuracy"] = last["val_accuracy"]
        summary["best_val_accuracy"] = max(r["val_accuracy"] for r in history)
    return summary


def load_trained(run_dir: str | Path) -> tuple[nn.Module, dict[str, torch.Tensor], TrainConfig]:
    """The model of a run with its latest checkpointed weights, its masks and its config."""
    state = load_checkpoint(checkpoint_path(run_dir))
    config = from_dict(state["config"])
    model = build_model(config, tuple(state["in_shape"]), int(state["num_classes"]))
    model.load_state_dict(state["model"])
    model.eval()
    return model, dict(state.get("masks", {})), config


def default_log(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
