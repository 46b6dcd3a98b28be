"""CPU-side checks of what a GPU run relies on (the CUDA side is tests/gpu/).

* SparseLinear's cached index structures follow its buffers when the module is moved
  (``.to(device)`` replaces every tensor; a stale CSR/CSC would index the old device).
* SparseLinear under autocast: bf16 activations from an autocast ``nn.Linear`` meet fp32
  values; the layer computes in the values' dtype, exactly as on an fp32 input.
* The engine's random choices come from a CPU generator and are moved to the weights'
  device, so a seed gives the same initial masks whatever the device.
"""
from __future__ import annotations

import warnings

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


def test_sampled_grad_of_a_layers_own_topology_needs_no_sort(route):
    # the backward's weight gradient on torch.sparse (the CUDA path) passes the topology's row
    # pointer instead of sorting the pairs and counting rows (bincount syncs on CUDA)
    from regrow.nn.sparse_linear import sampled_grad
    layer = SparseLinear(30, 20, 0.3, seed=2)
    topo = layer.topology()
    h_t, delta_t = torch.randn(30, 9), torch.randn(20, 9)
    sorted_path = sampled_grad(20, topo.row, topo.col_long, h_t, delta_t, crow=topo.crow)
    sorting_path = sampled_grad(20, topo.row, topo.col, h_t, delta_t)
    want = (delta_t @ h_t.t())[topo.row.long(), topo.col.long()]
    torch.testing.assert_close(sorted_path, want)
    torch.testing.assert_close(sorting_path, want)


def test_torch_sparse_backward_matches_the_dense_layer(monkeypatch):
    from regrow.nn import _sparse_kernels
    monkeypatch.setattr(_sparse_kernels, "load", lambda: None)   # the route CUDA takes
    layer = SparseLinear(25, 14, 0.2, seed=6)
    dense = nn.Linear(25, 14)
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense())
        dense.bias.copy_(layer.bias)
    x = torch.randn(7, 25)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(xs).square().sum().backward()
    dense(xd).square().sum().backward()
    torch.testing.assert_close(xs.grad, xd.grad)
    torch.testing.assert_close(layer.values.grad, dense.weight.grad[layer.row_indices.long(), layer.col_indices.long()])
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)


def test_cuda_route_named_but_without_triton_says_so(monkeypatch):
    """REGROW_CUDA_SPARSE=triton where Triton does not import falls back to torch.sparse, with a
    warning; left unset, the fallback is silent (Triton is optional); a typo is an error."""
    from regrow.nn import _triton_kernels
    monkeypatch.setattr(_triton_kernels, "_KERNELS", {})   # as if Triton did not import
    monkeypatch.setenv("REGROW_CUDA_SPARSE", "triton")
    with pytest.warns(RuntimeWarning, match="Triton does not import"):
        assert _triton_kernels.route() == "torch"
    monkeypatch.delenv("REGROW_CUDA_SPARSE")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _triton_kernels.route() == "torch"
    monkeypatch.setenv("REGROW_CUDA_SPARSE", "cusparse")
    with pytest.raises(ValueError, match="REGROW_CUDA_SPARSE"):
        _triton_kernels.route()
