"""The training loop: output contract, schedules, data order, FLOPs in the summary."""
import json
import math

import pytest
import torch

from regrow.experiments.checkpoint import load_checkpoint, save_checkpoint
from regrow.experiments.config import TrainConfig
from regrow.experiments.ddp import Group, epoch_batches
from regrow.experiments.train import epoch_order, load_trained, lr_factor, read_metrics, train

TINY = TrainConfig(dataset="digits", widths=[16], epochs=2, batch_size=128, update_interval=3,
                   sparsity=0.8, threads=1)
SUMMARY_KEYS = {"method", "sparsity", "distribution", "seed", "model", "dataset", "epochs", "steps",
                "test_accuracy", "best_test_accuracy", "final_density", "itop_rate", "train_flops_ratio",
                "inference_flops_ratio", "wall_seconds"}


def test_output_contract(tmp_path):
    summary = train(TINY.replace(method="rigl"), tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["steps"] == 2 * math.ceil(1437 / 128) == summary["steps"]
    assert 0.0 <= on_disk["test_accuracy"] <= 1.0
    assert on_disk["best_test_accuracy"] >= on_disk["test_accuracy"]
    assert on_disk["final_density"] == pytest.approx(0.2, abs=0.01)
    assert on_disk["final_density"] < on_disk["itop_rate"] <= 1.0       # RigL explored
    # RigL pays a dense gradient at its updates: more than 3 f_S, far less than dense
    assert on_disk["inference_flops_ratio"] < on_disk["train_flops_ratio"] < 0.5
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("loss", "train_accuracy", "test_accuracy", "density", "itop_rate", "lr"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)     # cosine ends at zero
    ckpt = load_checkpoint(tmp_path)                           # weights_only load
    assert set(ckpt["masks"]) == set(summary["layers"])
    assert int(ckpt["masks"]["net.fc1.weight"].sum()) == summary["layers"]["net.fc1.weight"]["nnz"]
    assert (tmp_path / "config.yaml").is_file()


def test_dense_and_gmp_flops(tmp_path):
    dense = train(TINY.replace(method="dense", sparsity=0.0, epochs=1), tmp_path / "d")
    assert dense["train_flops_ratio"] == pytest.approx(1.0)
    assert dense["inference_flops_ratio"] == pytest.approx(1.0)
    assert dense["final_density"] == 1.0
    gmp = train(TINY.replace(method="gmp", epochs=2), tmp_path / "g")
    # starts dense and shrinks to 20%: its training cost lies between the two
    assert 0.2 < gmp["train_flops_ratio"] < 1.0
    assert gmp["inference_flops_ratio"] == pytest.approx(0.2, abs=0.01)
    static = train(TINY.replace(method="static", epochs=1), tmp_path / "s")
    assert static["train_flops_ratio"] == pytest.approx(static["inference_flops_ratio"])


def test_validation_split_and_load_trained(tmp_path):
    summary = train(TINY.replace(method="set", epochs=1, val_fraction=0.2), tmp_path)
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert "val_accuracy" in read_metrics(tmp_path)[0]
    model, masks, cfg = load_trained(tmp_path)
    weight = dict(model.named_parameters())["net.fc1.weight"]
    mask = masks["net.fc1.weight"]
    assert bool((weight[~mask] == 0).all()) and int(mask.sum()) == summary["layers"]["net.fc1.weight"]["nnz"]
    assert cfg.method == "set"


def test_refuses_used_folder(tmp_path):
    train(TINY.replace(method="static", epochs=1), tmp_path)
    with pytest.raises(ValueError, match="already holds a run"):
        train(TINY.replace(method="static", epochs=1), tmp_path)


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(100, seed=3, epoch=2)
    assert torch.equal(a.sort().values, torch.arange(100))
    assert torch.equal(a, epoch_order(100, seed=3, epoch=2))
    assert not torch.equal(a, epoch_order(100, seed=3, epoch=1))
    assert not torch.equal(a, epoch_order(100, seed=4, epoch=2))


@pytest.mark.parametrize("n,batch,seed,epoch", [(100, 32, 3, 2), (1437, 64, 0, 0), (7, 7, 11, 5)])
def test_train_batches_are_epoch_order_in_one_process(n, batch, seed, epoch):
    """train() takes its batches from ddp_train.epoch_batches; in one process they are
    epoch_order's permutation cut into batches (what benchmarks/peer_rigl.py relies on)."""
    batches = epoch_batches(n, batch, seed, epoch, Group())
    assert [len(b) for b in batches] == [min(batch, n - i) for i in range(0, n, batch)]
    assert torch.equal(torch.cat(batches), epoch_order(n, seed, epoch))


def test_lr_schedules_by_hand():
    cos = lr_factor(TrainConfig(epochs=4, warmup_epochs=1), steps_per_epoch=10)
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(10) == pytest.approx(1.0)
    assert cos(25) == pytest.approx(0.5)           # halfway through the 30 cosine steps
    assert cos(40) == pytest.approx(0.0)
    step = lr_factor(TrainConfig(epochs=10, lr_schedule="step", lr_gamma=0.5), steps_per_epoch=2)
    assert [step(s) for s in (0, 9, 10, 14, 15, 19)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    explicit = lr_factor(TrainConfig(epochs=10, lr_schedule="step", lr_steps=[2, 3]), steps_per_epoch=1)
    assert [explicit(s) for s in (1, 2, 3)] == pytest.approx([1, 0.1, 0.01])
    assert lr_factor(TrainConfig(lr_schedule="constant"), 5)(123) == 1.0


def test_checkpoint_is_atomic_and_plain(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"x": torch.arange(3), "nested": {"a": [1, 2.5, None, "s"]}}, path)
    assert load_checkpoint(path)["nested"]["a"] == [1, 2.5, None, "s"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]      # no temporary left behind
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(path)
    torch.save({"obj": object.__new__(_Foreign)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(tmp_path / "foreign.pt")                   # weights_only refuses objects


class _Foreign:
    pass
