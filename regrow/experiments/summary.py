"""What a run reports: the per-epoch row and line, and the final ``summary.json``."""
from __future__ import annotations

import platform
from datetime import datetime, timezone

import torch

from .._version import __version__
from ..core.distributed import mask_checksum
from .config import TrainConfig
from .evaluation import evaluate
from .loop import EpochSums, densities
from .setup import Run


def epoch_row(run: Run, epoch: int, sums: EpochSums) -> dict:
    """Evaluate the model and return the metrics row of the finished ``epoch``."""
    config, dst = run.config, run.dst
    test_acc, test_loss = evaluate(run.model, run.data.test, config.eval_batch_size)
    stats = dst.stats()
    row = {
        "epoch": epoch + 1, "step": dst.step_count,
        "loss": sums.loss_sum / max(sums.seen, 1),
        "train_accuracy": sums.correct / max(sums.seen, 1),
        "test_accuracy": test_acc, "test_loss": test_loss,
        "density": stats["density"], "itop_rate": stats["itop_rate"], "updates": stats["updates"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "train_flops_ratio": run.flops.end_epoch(),
        "epoch_seconds": sums.seconds,
    }
    if run.data.val is not None:
        row["val_accuracy"], row["val_loss"] = evaluate(run.model, run.data.val, config.eval_batch_size)
    return row


def epoch_line(config: TrainConfig, row: dict) -> str:
    line = (f"epoch {row['epoch']}/{config.epochs}  loss {row['loss']:.4f}  "
            f"train {100 * row['train_accuracy']:.2f}%  test {100 * row['test_accuracy']:.2f}%  ")
    if "val_accuracy" in row:
        line += f"val {100 * row['val_accuracy']:.2f}%  "
    return line + (f"density {row['density']:.4f}  itop {row['itop_rate']:.4f}  lr {row['lr']:.4g}  "
                   f"({row['epoch_seconds']:.1f}s)")


def run_summary(run: Run, history: list[dict], wall_seconds: float) -> dict:
    """The finished run's ``summary.json`` contents."""
    config, dst, model, flops = run.config, run.dst, run.model, run.flops
    stats = dst.stats()
    f_dense = flops.layers.dense
    f_sparse = flops.layers.forward(densities(run))
    # the sparsified weights by their dense size and active count (an always-sparse layer stores
    # only its active values, so counting its parameters as stored would mix the two)
    sparsified = {t.name for t in dst.targets}
    others = sum(p.numel() for name, p in model.named_parameters() if name not in sparsified)
    last = history[-1]
    summary = {
        "method": config.method, "sparsity": config.sparsity, "distribution": config.distribution,
        "seed": config.seed, "model": config.model, "dataset": run.data.name, "epochs": config.epochs,
        "steps": dst.step_count, "batch_size": config.batch_size, "backend": config.backend,
        "test_accuracy": last["test_accuracy"],
        "best_test_accuracy": max(r["test_accuracy"] for r in history),
        "final_density": stats["density"], "itop_rate": stats["itop_rate"], "updates": stats["updates"],
        "train_flops_ratio": flops.ratio, "inference_flops_ratio": f_sparse / f_dense if f_dense else 1.0,
        "dense_forward_flops": f_dense, "sparse_forward_flops": f_sparse, "train_flops": flops.total,
        "wall_seconds": wall_seconds, "seconds_per_step": wall_seconds / max(dst.step_count, 1),
        "final_loss": last["loss"], "final_train_accuracy": last["train_accuracy"],
        "params": {"total": others + stats["numel"], "sparsified": stats["numel"],
                   "active_sparsified": stats["nnz"], "active": others + stats["nnz"]},
        "layers": stats["layers"],
        "regrow_version": __version__, "torch_version": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "world_size": run.group.world_size, "mask_checksum": mask_checksum(dst.targets),
    }
    if "val_accuracy" in last:
        summary["val_accuracy"] = last["val_accuracy"]
        summary["best_val_accuracy"] = max(r["val_accuracy"] for r in history)
    return summary
