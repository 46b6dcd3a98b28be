"""The training loop behind ``regrow train``: one run, checkpointed, resumable bit for bit.

A run directory holds ``config.yaml``, ``metrics.jsonl`` and, once finished, ``summary.json``
(see :mod:`.runfiles`), and ``checkpoint.pt``: model, optimizer, LR scheduler, DST state
(masks, counters, RNG), the global RNGs (the CPU's, and every GPU's when CUDA is available),
the epoch and the batch reached inside it, the metric history (written at every epoch end and
every ``checkpoint_every`` steps, atomically).

Exact resume: the data order of epoch e is a permutation drawn from a generator seeded by
(seed, e), so a resumed run rebuilds it and skips the batches already consumed; every other
random stream (global torch RNG for dropout, the DST generator) is restored from the
checkpoint. Under torchrun (see :mod:`.ddp`) a seeded DistributedSampler deals that same
permutation out to the ranks, so the global batches are the single-process ones, the model is
wrapped in DDP, and only rank 0 writes.

The parts: :mod:`.setup` builds the run, :mod:`.loop` trains an epoch, :mod:`.summary`
evaluates and reports, :mod:`.checkpoint` saves and restores.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import ddp
from .checkpoint import (CHECKPOINT_NAME, checkpoint_path, load_run_checkpoint, rng_states, save_checkpoint,
                         set_rng_states)
from .config import TrainConfig, describe_differences, from_dict, save_yaml
from .loop import EpochSums, NonFiniteLoss, progress_bar, train_epoch
from .runfiles import (CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, read_metrics, read_summary, run_lock, write_json,
                       write_metrics)
from .setup import Run, build_model, build_run, epoch_order, lr_factor, make_optimizer, make_sparsity
from .summary import epoch_line, epoch_row, run_summary
from .watch import RunWatch

__all__ = ["train", "load_trained", "default_log", "build_model", "epoch_order", "lr_factor",
           "make_optimizer", "make_sparsity", "read_metrics", "read_summary", "CONFIG_NAME",
           "METRICS_NAME", "SUMMARY_NAME"]


def train(config: TrainConfig | None, out_dir: str | Path, *, resume: bool = False,
          progress: bool = False, log: Callable[[str], None] | None = None,
          progress_position: int = 0, is_main_process: bool = True,
          stop_after_steps: int | None = None, tensorboard: bool = False) -> dict | None:
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
        tensorboard: also write TensorBoard scalars to ``out_dir/tensorboard`` (see
            :mod:`.watch`; needs the tensorboard package). Every run writes ``updates.jsonl``.

    Raises:
        ValueError / FileNotFoundError: bad configuration, data or run directory; the run folder
            in use by another process; ``NonFiniteLoss`` (a ValueError) when the loss becomes NaN
            or infinite: the run stops there, its last checkpoint kept as it was.
    """
    out = Path(out_dir)
    if config is not None and config.method == "imp":
        raise ValueError("method 'imp' runs as rounds of ordinary runs: use regrow.experiments.imp.run_imp "
                         "(or regrow train --method imp)")
    # under torchrun (regrow.cli joined the process group): rank 0 alone writes and reports
    group = ddp.current_group()
    writes = is_main_process and group.is_main
    if not writes:
        return _train(config, out, resume, progress=False, log=None, progress_position=progress_position,
                      writes=False, group=group, stop_after_steps=stop_after_steps, tensorboard=False)
    if not resume:
        if config is None:
            raise ValueError("train() needs a config unless resuming")
        config.validate()   # before a folder is made for it
        out.mkdir(parents=True, exist_ok=True)
    # one writer per run folder, released on exit, crash or kill (a missing folder fails below)
    with run_lock(out) if out.is_dir() else contextlib.nullcontext():
        return _train(config, out, resume, progress=progress, log=log, progress_position=progress_position,
                      writes=True, group=group, stop_after_steps=stop_after_steps, tensorboard=tensorboard)


def _train(config: TrainConfig | None, out: Path, resume: bool, *, progress: bool,
           log: Callable[[str], None] | None, progress_position: int, writes: bool, group,
           stop_after_steps: int | None, tensorboard: bool) -> dict | None:
    config, state = _config_and_checkpoint(config, out, resume)
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)

    run = build_run(config, group)
    start_epoch, start_batch, history, wall_before = 0, 0, [], 0.0
    sums = EpochSums()
    if state is not None:
        run.load_state(state)
        set_rng_states(state)
        start_epoch, start_batch = int(state["epoch"]), int(state["batch"])
        history, wall_before = list(state["history"]), float(state["wall_seconds"])
        # the checkpoint holds the sums over all ranks: one rank carries them on
        sums = EpochSums(**state["running"]) if group.is_main else EpochSums(seconds=state["running"]["seconds"])
    elif writes:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(config, out / CONFIG_NAME)
    if writes and state is None and config.rewind_epoch == 0:
        _save_rewind(run, out)
    if writes:
        write_metrics(out / METRICS_NAME, history)
    watch = RunWatch(out, tensorboard=tensorboard, resumed_step=None if state is None else int(state["step"])) \
        if writes else None

    session_start = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - session_start

    saved_step = [int(state["step"]) if state is not None else None]   # the last good checkpoint's

    def checkpoint(epoch: int, batch: int, sums: EpochSums) -> None:
        totals = sums.over_ranks(group)   # a collective: every rank gets here
        if writes:
            save_checkpoint(_checkpoint_state(run, epoch, batch, history, totals, wall()), out / CHECKPOINT_NAME)
        saved_step[0] = run.dst.step_count

    net = ddp.wrap(run.model, group)   # DDP all-reduces gradients; the engine works on the unwrapped model
    epochs_bar = progress_bar(range(start_epoch, config.epochs), desc=f"{config.method} {config.sparsity:g}",
                              initial=start_epoch, total=config.epochs, unit="epoch",
                              disable=not progress, position=progress_position, leave=progress_position == 0)
    run.model.train()
    for epoch in epochs_bar:
        first = start_batch if epoch == start_epoch else 0
        if first == 0:
            sums = EpochSums()
        try:
            finished = train_epoch(run, net, epoch, first, sums, progress=progress, position=progress_position,
                                   stop_after_steps=stop_after_steps, checkpoint=checkpoint, watch=watch)
        except NonFiniteLoss as err:
            epochs_bar.close()
            if watch is not None:
                watch.close()
            kept = (f"the last good checkpoint, {out / CHECKPOINT_NAME} (step {saved_step[0]}), is kept; resuming "
                    "would reach the same step, so lower --lr (or check the data) and start a new run"
                    if saved_step[0] is not None else "no checkpoint was written yet; lower --lr or check the data")
            raise NonFiniteLoss(f"{err}; training stopped: {kept}") from None
        if not finished:
            epochs_bar.close()
            if watch is not None:
                watch.close()
            return None
        row = epoch_row(run, epoch, sums.over_ranks(group))
        history.append(row)
        sums = EpochSums()
        if writes:
            write_metrics(out / METRICS_NAME, history)
            watch.after_epoch(row)
        if writes and config.rewind_epoch == epoch + 1:   # before the checkpoint: a resume redoes it
            _save_rewind(run, out)
        checkpoint(epoch + 1, 0, sums)
        epochs_bar.set_postfix(loss=f"{row['loss']:.4f}", test=f"{row['test_accuracy']:.4f}",
                               density=f"{row['density']:.3f}")
        _log_epoch(log, progress, epoch_line(config, row))
    epochs_bar.close()
    if watch is not None:
        watch.close()

    summary = run_summary(run, history, wall())
    if writes:
        write_json(out / SUMMARY_NAME, summary)
    return summary


def _config_and_checkpoint(config: TrainConfig | None, out: Path, resume: bool) -> tuple[TrainConfig, dict | None]:
    """The run's configuration, and its checkpoint when resuming; refuses mismatches."""
    if not resume:
        if config is None:
            raise ValueError("train() needs a config unless resuming")
        if (out / SUMMARY_NAME).exists() or (out / CHECKPOINT_NAME).exists():
            raise ValueError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        return config, None
    if read_summary(out) is not None:
        raise ValueError(f"run in {out} already finished ({SUMMARY_NAME} exists); nothing to resume")
    state = load_run_checkpoint(out)   # the previous one, with a warning, if the newest is damaged
    saved = from_dict(state["config"])
    if config is not None:
        diff = describe_differences(saved, config)
        if diff:
            raise ValueError(f"--resume uses the run's own configuration; it differs in {', '.join(diff)}")
        saved = saved.replace(threads=config.threads)
    return saved, state


def _checkpoint_state(run: Run, epoch: int, batch: int, history: list[dict], sums: EpochSums,
                      wall_seconds: float) -> dict:
    return {
        "config": run.config.to_dict(), "epoch": epoch, "batch": batch, "step": run.dst.step_count,
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "dst": run.dst.state_dict(),
        "flops": run.flops.state_dict(), "history": history, **rng_states(),
        "running": sums.state(), "wall_seconds": wall_seconds,
        "masks": _masks(run), "in_shape": list(run.data.in_shape), "num_classes": run.data.num_classes,
    }


REWIND_NAME = "rewind.pt"


def _save_rewind(run: Run, out: Path) -> None:
    """The weights at the end of epoch ``rewind_epoch`` (0: the initial ones), for imp's rewinding."""
    tmp = out / f".{REWIND_NAME}.tmp"
    torch.save({k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}, tmp)
    tmp.replace(out / REWIND_NAME)


def _masks(run: Run) -> dict[str, torch.Tensor]:
    """Final masks for plots and exports (layers whose backend has no dense mask are left out)."""
    out = {}
    for t in run.dst.targets:
        try:
            out[t.name] = t.mask.detach().cpu().clone()
        except NotImplementedError:
            continue
    return out


def _log_epoch(log: Callable[[str], None] | None, progress: bool, line: str) -> None:
    if log is None:
        return
    if progress:   # print above the bars instead of through them
        from tqdm.auto import tqdm
        tqdm.write(line)
    else:
        log(line)


def load_trained(run_dir: str | Path) -> tuple[nn.Module, dict[str, torch.Tensor], TrainConfig]:
    """The model of a run with its latest checkpointed weights, its masks and its config."""
    state = load_run_checkpoint(run_dir)
    config = from_dict(state["config"])
    model = build_model(config, tuple(state["in_shape"]), int(state["num_classes"]))
    model.load_state_dict(state["model"])
    model.eval()
    return model, dict(state.get("masks", {})), config


def default_log(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
