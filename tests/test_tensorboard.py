"""``regrow train --tensorboard`` and the per-update lines (``updates.jsonl``)."""
from __future__ import annotations

import math

import pytest

from regrow.experiments.checkpoint import load_checkpoint
from regrow.experiments.cli import main
from regrow.experiments.config import TrainConfig
from regrow.experiments.train import train
from regrow.experiments.watch import read_updates

# digits: 1437 training samples, batch 64 -> 23 steps per epoch
CFG = TrainConfig(dataset="digits", widths=[24], epochs=1, batch_size=64, update_interval=4, sparsity=0.8,
                  threads=1, method="set")


def test_updates_jsonl_has_one_line_per_update_with_rewired_counts(tmp_path):
    summary = train(CFG, tmp_path / "run")
    lines = read_updates(tmp_path / "run")
    # updates every 4 steps before stop_fraction 0.75 x 23 = 17.25: steps 4, 8, 12, 16
    assert [u["step"] for u in lines] == [4, 8, 12, 16] and summary["updates"] == 4
    nnz = {name: int(mask.sum()) for name, mask in load_checkpoint(tmp_path / "run")["masks"].items()}
    for u in lines:
        assert u["epoch"] == 1 and 0 < u["drop_fraction"] <= 0.3
        assert u["density"] == pytest.approx(0.2, abs=0.01)
        for name, (dropped, grown) in u["layers"].items():
            # SET rewires k = floor(alpha_t x nnz) in each layer, keeping its count
            assert dropped == grown == math.floor(u["drop_fraction"] * nnz[name])
    assert all(grown > 0 for u in lines[:3] for _, grown in u["layers"].values())
    # the first update rewires floor(0.3 x nnz) of each layer (cosine schedule starts at 0.3)
    first = lines[0]
    assert first["drop_fraction"] == pytest.approx(0.3 * (1 + math.cos(math.pi * 4 / 17.25)) / 2)
    itop = [u["itop_rate"] for u in lines]
    assert itop == sorted(itop) and itop[-1] > itop[0] and itop[-1] == pytest.approx(summary["itop_rate"])


def test_resumed_run_keeps_only_the_checkpointed_updates(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    cfg = CFG.replace(checkpoint_every=6)
    train(cfg, whole)
    assert train(cfg, broken, stop_after_steps=14) is None     # killed at 14, checkpoint at 12
    assert [u["step"] for u in read_updates(broken)] == [4, 8, 12]
    train(None, broken, resume=True)
    assert read_updates(broken) == read_updates(whole)


def test_tensorboard_flag_writes_scalars(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code = main(["train", "--dataset", "digits", "--widths", "24", "--epochs", "1", "--batch-size", "64",
                 "--update-interval", "4", "--method", "rigl", "--sparsity", "0.8", "--threads", "1",
                 "--quiet", "--tensorboard", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "sparsity/density", "sparsity/itop_rate", "epoch/test_accuracy",
            "epoch/train_accuracy", "epoch/density", "epoch/itop_rate"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 24))
    assert [e.step for e in events.Scalars("sparsity/itop_rate")] == [4, 8, 12, 16]
    density = events.Scalars("epoch/density")
    assert len(density) == 1 and density[0].value == pytest.approx(0.2, abs=0.01)


def test_itop_plot_uses_the_update_lines(tmp_path, monkeypatch):
    from regrow.experiments import plots
    from regrow.experiments.report import aggregate, collect_runs

    train(CFG, tmp_path / "set")
    runs = collect_runs(tmp_path)
    assert [u["step"] for u in runs[0]["update_lines"]] == [4, 8, 12, 16]
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    plots.plot_itop(runs, aggregate(runs), tmp_path / "itop.png")
    (line,) = drawn[0].axes[0].lines
    assert list(line.get_xdata()) == [4, 8, 12, 16]   # a curve from a one-epoch run
    assert list(line.get_ydata()) == [u["itop_rate"] for u in runs[0]["update_lines"]]
    assert drawn[0].axes[0].get_xlabel() == "step"
