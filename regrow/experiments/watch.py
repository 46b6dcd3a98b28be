"""Step-level records of a ``regrow train`` run, besides the per-epoch ``metrics.jsonl``:

- ``updates.jsonl``: one line per topology update: step, epoch, drop fraction, density, ITOP
  rate, and each layer's dropped and grown counts (``{"layer": [dropped, grown]}``), so that a
  one-epoch run still has curves to plot;
- with ``--tensorboard``, TensorBoard event files in ``tensorboard/``: training loss and learning
  rate every step, density and ITOP at every update, and the epoch rows' loss, accuracies,
  density and ITOP.

On resume, what the interrupted process wrote after its last checkpoint is dropped (lines of
later steps; TensorBoard's ``purge_step``), so the records match an uninterrupted run's.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core import strict_json

UPDATES_NAME = "updates.jsonl"
TENSORBOARD_DIR = "tensorboard"
EPOCH_SCALARS = {"loss": "epoch/train_loss", "train_accuracy": "epoch/train_accuracy",
                 "test_accuracy": "epoch/test_accuracy", "test_loss": "epoch/test_loss",
                 "val_accuracy": "epoch/val_accuracy", "density": "epoch/density",
                 "itop_rate": "epoch/itop_rate", "lr": "epoch/lr"}


def read_updates(run_dir: str | Path) -> list[dict]:
    """The run's per-update lines (empty when it has none)."""
    path = Path(run_dir) / UPDATES_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunWatch:
    """Writes ``updates.jsonl`` and, when asked, TensorBoard scalars for one run (main process)."""

    def __init__(self, out: Path, *, tensorboard: bool, resumed_step: int | None):
        self.updates_path = out / UPDATES_NAME
        kept = [u for u in read_updates(out) if u["step"] <= resumed_step] if resumed_step is not None else []
        self.updates_path.write_text("".join(strict_json.dumps(u) + "\n" for u in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:   # torch's module needs the tensorboard package
                raise ValueError(f"--tensorboard needs the tensorboard package ({err}); "
                                 "pip install tensorboard") from None
            purge = resumed_step + 1 if resumed_step is not None else None
            self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=purge)

    def after_step(self, dst, epoch: int, loss: float, lr: float) -> None:
        step = dst.step_count
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
        update = dst.last_update
        if update is None or update["step"] != step:
            return
        stats = dst.stats()
        line = {"step": step, "epoch": epoch + 1, "drop_fraction": update["drop_fraction"],
                "density": stats["density"], "itop_rate": stats["itop_rate"],
                "layers": {name: [c["dropped"], c["grown"]] for name, c in update["layers"].items()}}
        with open(self.updates_path, "a") as fh:
            fh.write(strict_json.dumps(line) + "\n")
        if self.writer is not None:
            self.writer.add_scalar("sparsity/density", stats["density"], step)
            self.writer.add_scalar("sparsity/itop_rate", stats["itop_rate"], step)
            self.writer.add_scalar("sparsity/rewired", sum(c["grown"] for c in update["layers"].values()), step)

    def after_epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, tag in EPOCH_SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
