"""An interrupted run, resumed, ends bit for bit where an uninterrupted run ends."""
import json

import pytest
import torch

from regrow.experiments.checkpoint import load_checkpoint, save_checkpoint
from regrow.experiments.cli import main
from regrow.experiments.config import TrainConfig
from regrow.experiments.train import train

# digits: 1437 training samples, batch 64 -> 23 steps per epoch, 46 in all
BASE = TrainConfig(dataset="digits", widths=[24], epochs=2, batch_size=64, update_interval=4,
                   sparsity=0.8, threads=1)


def _final(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")


def _assert_same_run(a, b):
    sa, sb = _final(a), _final(b)
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), f"weights differ in {key}"
    for name, mask in sa["masks"].items():
        assert torch.equal(mask, sb["masks"][name]), f"mask differs in {name}"
    for pid, state in sa["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["optimizer"]["state"][pid][k]))
    assert torch.equal(sa["dst"]["generator"], sb["dst"]["generator"])
    ha = [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in sa["history"]]
    hb = [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in sb["history"]]
    assert ha == hb
    ja, jb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("test_accuracy", "itop_rate", "train_flops_ratio", "steps", "updates", "final_density"):
        assert ja[key] == jb[key], key


@pytest.mark.parametrize("method,extra,stop,every", [
    ("set", {}, 30, 7),                                   # killed mid-epoch 2, last checkpoint at step 28
    ("rigl", {"optimizer": "adamw", "lr": 0.01, "lr_schedule": "step", "label_smoothing": 0.1}, 25, 0),
    ("dstee", {"warmup_epochs": 0.5}, 17, 5),             # killed in epoch 1, checkpoint at step 15
    ("gse", {"sampling": "graest", "gamma": 2.0}, 40, 9),
    # dropout draws from the global RNG, which the checkpoint must restore too
    ("rigl", {"model": "vit", "widths": [], "epochs": 1, "batch_size": 128, "distribution": "uniform",
              "model_options": {"dim": 16, "depth": 1, "heads": 2, "patch_size": 4, "dropout": 0.2}}, 9, 4),
])
def test_resume_is_bitwise(tmp_path, method, extra, stop, every):
    cfg = BASE.replace(method=method, checkpoint_every=every, **extra)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert train(cfg, whole) is not None
    assert train(cfg, broken, stop_after_steps=stop) is None
    assert not (broken / "summary.json").exists()
    ckpt = _final(broken)
    per_epoch = -(-1437 // cfg.batch_size)
    expected_step = (stop // every) * every if every else per_epoch * (stop // per_epoch)
    assert ckpt["step"] == expected_step
    train(None, broken, resume=True)
    _assert_same_run(whole, broken)


def test_resume_through_the_cli(tmp_path, capsys):
    cfg = BASE.replace(method="srigl", checkpoint_every=6)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(cfg, whole)
    train(cfg, broken, stop_after_steps=35)
    metrics_before = (broken / "metrics.jsonl").read_text().splitlines()
    assert len(metrics_before) == 1
    assert main(["train", "--resume", str(broken), "--quiet"]) == 0
    _assert_same_run(whole, broken)
    assert len((broken / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_refuses_finished_and_changed_runs(tmp_path, capsys):
    cfg = BASE.replace(method="static", epochs=1)
    train(cfg, tmp_path / "done")
    with pytest.raises(ValueError, match="already finished"):
        train(None, tmp_path / "done", resume=True)
    train(cfg, tmp_path / "cut", stop_after_steps=5)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(None, tmp_path / "cut", resume=True)   # killed before the first checkpoint
    cfg2 = cfg.replace(checkpoint_every=3)
    train(cfg2, tmp_path / "cut2", stop_after_steps=5)
    with pytest.raises(ValueError, match="differs in lr"):
        train(cfg2.replace(lr=0.5), tmp_path / "cut2", resume=True)
    assert main(["train", "--resume", str(tmp_path / "cut2"), "--lr", "0.3", "--quiet"]) == 1
    assert "drop --lr" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg2, tmp_path / "cut2")


def test_checkpoints_carry_gpu_rng_states_and_cpu_checkpoints_still_load(tmp_path, monkeypatch):
    cfg = BASE.replace(method="static", epochs=1, checkpoint_every=5)
    cpu = tmp_path / "cpu"
    train(cfg, cpu, stop_after_steps=7)
    ckpt = _final(cpu)                                   # torch.load(weights_only=True)
    assert ckpt["cuda_rng"] == [] and ckpt["rng"].dtype == torch.uint8
    del ckpt["cuda_rng"]                                 # as written before GPU states were saved
    save_checkpoint(ckpt, cpu / "checkpoint.pt")
    assert train(None, cpu, resume=True) is not None

    # with CUDA (faked: this machine has none) every device's state is saved, and restored on resume
    fake = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in fake])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)   # resumed on fewer devices
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device, s.clone()))
    gpu = tmp_path / "gpu"
    train(cfg, gpu, stop_after_steps=7)
    ckpt = _final(gpu)
    assert len(ckpt["cuda_rng"]) == 2 and all(torch.equal(a, b) for a, b in zip(ckpt["cuda_rng"], fake))
    assert not restored
    assert train(None, gpu, resume=True) is not None
    assert list(restored) == [0] and torch.equal(restored[0], fake[0])
