"""Every method trains an MLP and a small CNN on the built-in digits data at 90% sparsity."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import regrow
from regrow.data import load
from regrow.models import build as build_model

EPOCHS = 12
BATCH = 64


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _train(method, model_name, digits, **options):
    torch.manual_seed(0)
    model = build_model(model_name, digits.num_classes, digits.in_shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    n = len(digits.train)
    steps = EPOCHS * ((n + BATCH - 1) // BATCH)
    dst = regrow.DynamicSparsity(model, optimizer, method=method, sparsity=0.9, total_steps=steps,
                                 update_interval=20, seed=0, **options)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, BATCH):
            x, y = digits.train.get_batch(perm[i:i + BATCH])
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            dst.step(closure=lambda: nn.functional.cross_entropy(model(x), y))   # read by grasp only
    model.eval()
    x, y = digits.test.get_batch(torch.arange(len(digits.test)))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return accuracy, dst.stats()


@pytest.mark.parametrize("model_name", ["mlp", "lenet5"])
@pytest.mark.parametrize("method", list(regrow.METHODS))
def test_each_method_learns_digits_at_90_percent_sparsity(method, model_name, digits):
    accuracy, stats = _train(method, model_name, digits)
    expected_density = 1.0 if method == "dense" else 0.1
    assert stats["density"] == pytest.approx(expected_density, abs=0.01)
    if regrow.methods.REGISTRY[method].dynamic and method != "dense":
        assert stats["updates"] > 0
    # chance is 10%; a sparse network that trains at all is far above it
    assert accuracy > 0.80, f"{method}/{model_name}: test accuracy {accuracy:.3f}"
