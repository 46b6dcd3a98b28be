"""Every method on the masked backend, on the device: MLP, ResNet-20 and ViT, SGD and AdamW,
fp32, bf16 autocast and fp16 autocast with a GradScaler.

The CPU suite's invariants hold after every step (exact counts, inactive weights and their
optimizer state exactly zero); a seed gives the CPU's initial masks and, with deterministic
algorithms, the same masks and weights run after run; a run resumed from a checkpoint ends
bit for bit where the uninterrupted run ends.
"""
from __future__ import annotations

import math

import pytest
import torch

import regrow
from gpu_helpers import (MODELS, OPTIMIZERS, PRECISIONS, Run, assert_bitwise_equal, batches,
                         check_invariants, skip_module_without_device, snapshot)

skip_module_without_device()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", regrow.METHODS)
def test_invariants_hold_on_device(device, method, model, opt, precision):
    run = Run(device, method, model, opt, precision)
    check_invariants(run)
    losses = []
    for x, y in batches(8, device):
        losses.append(float(run.train_step(x, y)))
        check_invariants(run)
    assert all(math.isfinite(v) for v in losses), losses
    expected_updates = len(run.dst.schedule.update_steps()) if run.dst.method.dynamic else 0
    if run.scaler is None:
        assert run.dst.stats()["updates"] == expected_updates
    else:   # a step the scaler skips (inf found) skips its topology update too
        assert run.dst.stats()["updates"] <= expected_updates
    if method == "gmp":   # pruned to the final count at the last update step
        assert all(t.nnz == t.budget for t in run.dst.targets)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", regrow.METHODS)
def test_a_seed_gives_the_cpu_initial_masks(device, method, model):
    # every random choice is drawn from the engine's CPU generator and moved to the weights
    on_device = Run(device, method, model, "sgd", "fp32", seed=7)
    on_cpu = Run(torch.device("cpu"), method, model, "sgd", "fp32", seed=7)
    for name, mask in on_cpu.dst.masks.items():
        assert torch.equal(on_device.dst.masks[name].cpu(), mask), name
    for (name, a), b in zip(on_cpu.model.state_dict().items(), on_device.model.state_dict().values()):
        torch.testing.assert_close(b.cpu(), a, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", regrow.METHODS)
def test_same_seed_same_run(device, deterministic, method, model, precision):
    def final():
        run = Run(device, method, model, "adamw", precision, seed=3)
        for x, y in batches(8, device, seed=1):
            run.train_step(x, y)
        return snapshot(run)
    assert_bitwise_equal(final(), final())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", regrow.METHODS)
def test_resume_is_bitwise_on_device(device, deterministic, method, model, precision):
    data = batches(10, device, seed=2)
    whole = Run(device, method, model, "adamw", precision, total_steps=10, seed=5)
    blob = None
    for i, (x, y) in enumerate(data):
        whole.train_step(x, y)
        if i == 4:   # after step 5: the step after it (6) is an update step
            blob = whole.state()
    # another model init (so other initial masks' values): the checkpoint must overwrite it all
    resumed = Run(device, method, model, "adamw", precision, total_steps=10, seed=5, model_seed=1)
    resumed.load(blob)
    assert resumed.dst.step_count == 5
    for x, y in data[5:]:
        resumed.train_step(x, y)
    assert_bitwise_equal(snapshot(whole), snapshot(resumed))
