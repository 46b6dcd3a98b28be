"""CPU-side checks of what a GPU run relies on (the CUDA side is tests/gpu/).

* SparseLinear's cached index structures follow its buffers when the module is moved
  (``.to(device)`` replaces every tensor; a stale CSR/CSC would index the old device).
* SparseLinear under autocast: bf16 activations from an autocast ``nn.Linear`` meet fp32
  values; the layer computes in the values' dtype, exactly as on an fp32 input.
* The engine's random choices come from a CPU generator and are moved to the weights'
  device, so a seed gives the same initial masks whatever the device.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import regrow
from regrow.nn import SparseLinear


def test_sparse_linear_topology_follows_moved_buffers():
    layer = SparseLinear(12, 7, 0.4, seed=3)
    x = torch.randn(5, 12)
    before = layer(x)
    stale = layer.topology()
    layer._apply(lambda t: t.clone())          # what .to(device) does: every tensor replaced
    fresh = layer.topology()
    assert fresh is not stale
    assert fresh.row is layer.row_indices and fresh.col is layer.col_indices
    assert layer.topology() is fresh           # cached again until the next swap
    assert torch.equal(layer(x), before)


@pytest.mark.parametrize("backward_inside", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_linear_under_autocast_computes_in_its_values_dtype(route, dtype, backward_inside):
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    layer = SparseLinear(16, 9, 0.3, seed=1)
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=dtype):
        h = lin(x)
        assert h.dtype == dtype                # the case that used to raise a dtype error
        y = layer(h)
        if backward_inside:
            y.square().sum().backward()
    if not backward_inside:
        y.square().sum().backward()
    assert y.dtype == torch.float32
    got_values_grad = layer.values.grad.clone()

    # reference: the same low-precision activations, cast by hand, no autocast
    layer.values.grad = None
    h_ref = h.detach().float().requires_grad_()
    y_ref = layer(h_ref)
    y_ref.square().sum().backward()
    assert torch.equal(y, y_ref)
    assert torch.equal(got_values_grad, layer.values.grad)


def test_initial_masks_depend_on_the_seed_only():
    # the engine's generator is a CPU one; draws are made on the CPU and moved to the
    # weights, so the masks of a seed do not depend on the device or the global RNG
    def build(global_seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(global_seed)
        return regrow.DynamicSparsity(model, opt, method="set", sparsity=0.7, total_steps=10, seed=5)
    a, b = build(1), build(2)
    assert a.generator.device.type == "cpu"
    assert a.masks.keys() == b.masks.keys()
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
