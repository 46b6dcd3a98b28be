"""One epoch of training steps: forward, backward, the engine's step, FLOPs and running sums."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from . import ddp
from .flops import gse_subset_fraction
from .setup import Run


class NonFiniteLoss(ValueError):
    """The training loss became NaN or infinite: training stops before that step's update."""


@dataclass
class EpochSums:
    """Running sums of the epoch in progress (saved in mid-epoch checkpoints)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def state(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "seconds": self.seconds}

    def over_ranks(self, group: ddp.Group) -> "EpochSums":
        """The loss/accuracy sums over all ranks (the time is this rank's)."""
        if not group.distributed:
            return self
        loss_sum, correct, seen = ddp.sum_over_ranks(self.loss_sum, self.correct, self.seen)
        return EpochSums(loss_sum, int(correct), int(seen), self.seconds)


def densities(run: Run) -> dict[str, float]:
    return {t.name: t.nnz / t.numel for t in run.dst.targets}


def counts(run: Run) -> dict[str, tuple[int, int]]:
    return {t.name: (t.nnz, t.numel) for t in run.dst.targets}


def progress_bar(iterable=None, **kwargs):
    from tqdm.auto import tqdm
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def train_epoch(run: Run, net, epoch: int, first: int, sums: EpochSums, *, progress: bool,
                position: int, stop_after_steps: int | None,
                checkpoint: Callable[[int, int, EpochSums], None], watch=None) -> bool:
    """Train batches ``first..`` of ``epoch`` into ``sums``; False when ``stop_after_steps`` hit.

    ``checkpoint(epoch, next_batch, sums)`` is called every ``checkpoint_every`` steps inside the
    epoch (the epoch's end is checkpointed by the caller). ``watch``, a
    :class:`~regrow.experiments.watch.RunWatch`, sees every step.
    """
    config, dst, group = run.config, run.dst, run.group
    run.data.train.set_epoch(epoch)
    # this rank's share of each global batch (one process: epoch_order's batches)
    batches = ddp.epoch_batches(run.n_train, config.batch_size, config.seed, epoch, group)
    layer_density, layer_counts = densities(run), counts(run)
    bar = progress_bar(range(first, run.steps_per_epoch), initial=first, total=run.steps_per_epoch,
                       desc=f"epoch {epoch + 1}", unit="step", leave=False,
                       disable=not progress, position=position + 1)
    t_epoch = time.perf_counter()
    for b in bar:
        idx = batches[b]
        x, y = run.data.train.get_batch(idx)
        x, y = x.to(group.device, non_blocking=True), y.to(group.device, non_blocking=True)
        run.optimizer.zero_grad(set_to_none=True)
        logits = net(x)
        loss = run.loss_fn(logits, y)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):   # never train on, nor checkpoint, a diverged model
            raise NonFiniteLoss(f"the training loss is {loss_value} at step {dst.step_count + 1} "
                                f"(epoch {epoch + 1}, batch {b + 1})")
        loss.backward()

        t_next = dst.step_count + 1
        update = dst.method.dynamic and dst.schedule.is_update(t_next)
        subset = None
        dense_every_step = dst.method.observes_gradients   # snfs reads the dense gradient at every step
        if hasattr(dst.method, "step_gradient_fraction"):   # top-kast: weight gradients over its set B
            subset = {t.name: dst.method.step_gradient_fraction(t) for t in dst.targets}
        elif update and run.growth == "subset_grad":
            frac = dst.schedule.fraction(t_next)
            subset = {name: gse_subset_fraction(nnz, numel, dst.method.gamma, frac)
                      for name, (nnz, numel) in layer_counts.items()}
        run.flops.add_step(layer_density, len(idx) * group.world_size,
                           run.growth if update or dense_every_step else "none", subset)
        first = dst.step_count == 0
        # grasp decides its masks from the first batch's loss, recomputed with a graph
        dst.step(closure=lambda: run.loss_fn(net(x), y))
        if watch is not None:   # per-update lines and TensorBoard (regrow.experiments.watch)
            watch.after_step(dst, epoch, loss_value, run.optimizer.param_groups[0]["lr"])
        run.scheduler.step()
        if update or first:   # pruning at init sets its masks inside the first step
            layer_density, layer_counts = densities(run), counts(run)

        sums.loss_sum += loss_value * len(idx)
        sums.correct += int((logits.argmax(1) == y).sum())
        sums.seen += len(idx)
        if progress:
            nnz, numel = (sum(c[i] for c in layer_counts.values()) for i in (0, 1))
            bar.set_postfix(loss=f"{sums.loss_sum / sums.seen:.4f}", acc=f"{sums.correct / sums.seen:.3f}",
                            density=f"{nnz / max(numel, 1):.3f}", refresh=False)
        step = dst.step_count
        if stop_after_steps is not None and step >= stop_after_steps:
            bar.close()
            return False
        if config.checkpoint_every and step % config.checkpoint_every == 0 and b + 1 < run.steps_per_epoch:
            sums.seconds += time.perf_counter() - t_epoch
            t_epoch = time.perf_counter()
            checkpoint(epoch, b + 1, sums)
    bar.close()
    sums.seconds += time.perf_counter() - t_epoch
    return True
