"""SparseLinear, CondensedLinear and CSRLinear on the device against their CPU results.

On CUDA, SparseLinear runs on torch.sparse (cuSPARSE CSR matmuls and ``sampled_addmm``) and
CondensedLinear on ``F.embedding_bag``; the CPU runs the compiled loops where they apply. Sums
are taken in other orders, so values agree to float32 rounding; index work (topologies,
rewires, masks) agrees exactly.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regrow
from regrow.backends import SparseLinearTarget
from regrow.core.optim_state import OptimizerStateMasker
from regrow.methods import REGISTRY
from regrow.nn import CondensedLinear, CSRLinear, SparseLinear
from regrow.nn.sparse_linear import sampled_grad

from gpu_helpers import skip_module_without_device

skip_module_without_device()

TOL = dict(rtol=1e-4, atol=1e-5)
SPARSE_BACKEND_METHODS = [m for m in regrow.METHODS if REGISTRY[m].sparse_backend]


def _on(device, module):
    return copy.deepcopy(module).to(device)


# -- SparseLinear ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("density", [0.02, 0.3])
def test_sparse_linear_forward_backward_match_cpu(device, density, batch, bias):
    cpu = SparseLinear(96, 80, density, bias=bias, seed=4)
    dev = _on(device, cpu)
    assert dev.topology().crow.device.type == device.type
    x = torch.randn(batch, 3, 96)       # a 3-D input: the layer flattens the leading dims
    g = torch.randn(batch, 3, 80)
    outs = []
    for layer, dv in ((cpu, torch.device("cpu")), (dev, device)):
        xi = x.to(dv).detach().requires_grad_()   # a leaf on each device
        y = layer(xi)
        y.backward(g.to(dv))
        outs.append((y.detach(), xi.grad, layer.values.grad, None if layer.bias is None else layer.bias.grad))
    for a, b in zip(*outs):
        if a is not None:
            torch.testing.assert_close(b.cpu(), a, **TOL)


@pytest.mark.parametrize("cuda_route", ["triton", "torch"])
def test_both_cuda_routes_match_cpu(cuda_only, cuda_route, monkeypatch):
    """The Triton kernels (default on CUDA when Triton imports) and torch.sparse (cuSPARSE)."""
    from regrow.nn import _triton_kernels
    monkeypatch.setenv("REGROW_CUDA_SPARSE", cuda_route)
    if _triton_kernels.route() != cuda_route:
        pytest.skip("Triton does not import here")
    cpu = SparseLinear(300, 200, 0.05, seed=6)
    dev = _on(cuda_only, cpu)
    assert _triton_kernels.usable(dev.values) == (cuda_route == "triton")
    x, g = torch.randn(130, 300), torch.randn(130, 200)   # batch above one 128-wide tile
    outs = []
    for layer, dv in ((cpu, torch.device("cpu")), (dev, cuda_only)):
        xi = x.to(dv).detach().requires_grad_()
        y = layer(xi)
        y.backward(g.to(dv))
        outs.append((y.detach(), xi.grad, layer.values.grad, layer.bias.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b.cpu(), a, **TOL)
    r = dev.row_indices[::7]
    c = dev.col_indices.flip(0)[:r.numel()]   # pairs in no particular order
    h_t, d_t = torch.randn(300, 16, device=cuda_only), torch.randn(200, 16, device=cuda_only)
    want = (d_t @ h_t.t())[r.long(), c.long()]
    torch.testing.assert_close(sampled_grad(200, r, c, h_t, d_t), want, **TOL)


def test_sparse_linear_under_bf16_autocast_on_device(device):
    layer = SparseLinear(64, 48, 0.1, seed=2).to(device)
    lin = nn.Linear(32, 64).to(device)
    x = torch.randn(16, 32, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        h = lin(x)
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32
    y.square().sum().backward()
    assert torch.isfinite(layer.values.grad).all()
    torch.testing.assert_close(y, layer(h.detach().float()), **TOL)


def test_sampled_grad_matches_cpu(device):
    g = torch.Generator().manual_seed(0)
    rows, cols, batch = 50, 70, 24
    h_t, delta_t = torch.randn(cols, batch, generator=g), torch.randn(rows, batch, generator=g)
    flat = torch.randperm(rows * cols, generator=g)[:400]     # unsorted pairs, as GSE hands them
    r, c = (flat // cols).to(torch.int32), (flat % cols).to(torch.int32)
    want = (delta_t @ h_t.t()).reshape(-1)[flat]
    got = sampled_grad(rows, r.to(device), c.to(device), h_t.to(device), delta_t.to(device))
    torch.testing.assert_close(got.cpu(), want, **TOL)


def test_rewire_on_device_equals_rewire_on_cpu(device):
    cpu_layer = SparseLinear(40, 30, 0.2, seed=5)
    dev_layer = _on(device, cpu_layer)
    targets = []
    x = torch.randn(4, 40)
    for layer in (cpu_layer, dev_layer):
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        layer(x.to(layer.values.device)).sum().backward()
        opt.step()
        targets.append((SparseLinearTarget("w", layer, OptimizerStateMasker(opt)), opt))
    keys = cpu_layer.active_keys()
    inactive = torch.ones(1200, dtype=torch.bool)
    inactive[keys] = False
    drop = keys[torch.randperm(keys.numel(), generator=torch.Generator().manual_seed(1))[:20]].sort().values
    grow = inactive.nonzero().squeeze(1)[torch.randperm(int(inactive.sum()),
                                                        generator=torch.Generator().manual_seed(2))[:20]]
    values = torch.linspace(-0.1, 0.1, 20)
    for t, _ in targets:
        t.rewire(drop.to(t.device), grow.to(t.device), values.to(t.device))
    (tc, oc), (td, od) = targets
    # the topology is index work (exact); values and state went through an AdamW step each
    assert torch.equal(tc.active_indices(), td.active_indices().cpu())
    assert torch.equal(cpu_layer.row_indices, dev_layer.row_indices.cpu())
    torch.testing.assert_close(dev_layer.values.detach().cpu(), cpu_layer.values.detach(), **TOL)
    for k, v in oc.state[cpu_layer.values].items():
        torch.testing.assert_close(torch.as_tensor(od.state[dev_layer.values][k]).cpu(), torch.as_tensor(v),
                                   **TOL, msg=k)
    grown = torch.isin(tc.active_indices(), grow)
    assert bool((oc.state[cpu_layer.values]["exp_avg"][grown] == 0).all())
    assert bool((od.state[dev_layer.values]["exp_avg"][grown.to(device)] == 0).all())
    assert tc.ever_active_count() == td.ever_active_count()


@pytest.mark.filterwarnings("ignore:regrow. sparsity=.* has no effect")   # the layers fix their own count
@pytest.mark.parametrize("method", SPARSE_BACKEND_METHODS)
def test_always_sparse_training_on_device(device, method):
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(48, 64, 0.1, seed=1), nn.ReLU(), SparseLinear(64, 4, 0.25, seed=2)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    options = {"sampling": "graest"} if method == "gse" else {}
    dst = regrow.DynamicSparsity(model, opt, method=method, sparsity=0.9, total_steps=9, update_interval=2,
                                 stop_fraction=1.0, **options)
    counts = [t.nnz for t in dst.targets]
    g = torch.Generator().manual_seed(0)
    for _ in range(9):
        x, y = torch.randn(16, 48, generator=g).to(device), torch.randint(0, 4, (16,), generator=g).to(device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        dst.step()
        for t, n in zip(dst.targets, counts):
            keys = t.active_indices()
            assert keys.device.type == device.type
            if method == "srigl":   # constant fan-in once rewired (the layer's own init differs by one)
                if not dst.stats()["updates"]:
                    continue
                rows = t.row_counts()
                assert bool(((rows == 0) | (rows == rows.max())).all())
            else:
                assert t.nnz == n
            assert bool((keys[1:] > keys[:-1]).all()), "keys sorted and distinct"
    assert dst.stats()["updates"] == (4 if dst.method.dynamic else 0)


# -- CondensedLinear and CSRLinear ----------------------------------------------------------------
def _constant_fan_in(out_f, in_f, k, dead, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    for r in range(out_f):
        if r not in dead:
            mask[r, torch.randperm(in_f, generator=g)[:k]] = True
    w = torch.randn(out_f, in_f, generator=g) / k ** 0.5
    return w, mask, torch.randn(out_f, generator=g)


@pytest.mark.parametrize("index_dtype", ["int16", "int32", "int64"])
@pytest.mark.parametrize("batch", [1, 16, 256])
@pytest.mark.parametrize("dead", [(), (0, 5)])
def test_condensed_linear_matches_cpu(device, batch, dead, index_dtype):
    w, mask, b = _constant_fan_in(64, 200, 20, dead)
    cpu = CondensedLinear.from_dense(w, mask, b, index_dtype=index_dtype)
    built_there = CondensedLinear.from_dense(w.to(device), mask.to(device), b.to(device), index_dtype=index_dtype)
    moved = _on(device, cpu)
    x = torch.randn(batch, 200)
    want = F.linear(x, w * mask, b)
    torch.testing.assert_close(cpu(x), want, **TOL)
    for layer in (built_there, moved):
        assert layer.weight.device.type == device.type
        torch.testing.assert_close(layer(x.to(device)).cpu(), want, **TOL)
    assert torch.equal(built_there.indices.cpu(), cpu.indices)


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("batch", [1, 16, 256])
def test_csr_linear_matches_cpu(device, batch, index_dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 200, generator=g)
    mask = torch.rand(64, 200, generator=g) < 0.1
    b = torch.randn(64, generator=g)
    x = torch.randn(batch, 200, generator=g)
    want = F.linear(x, w * mask, b)
    for layer in (CSRLinear.from_dense(w.to(device), mask.to(device), b.to(device), index_dtype=index_dtype),
                  _on(device, CSRLinear.from_dense(w, mask, b, index_dtype=index_dtype))):
        torch.testing.assert_close(layer(x.to(device)).cpu(), want, **TOL)


# -- SparseConv2d and sparsified zoo models ------------------------------------------------------
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
@pytest.mark.parametrize("density", [0.05, 0.5])
def test_sparse_conv2d_forward_backward_match_cpu(device, density, stride, padding):
    from regrow.nn import SparseConv2d
    cpu = SparseConv2d(6, 10, 3, stride=stride, padding=padding, density=density, seed=3)
    dev = _on(device, cpu)
    x = torch.randn(5, 6, 9, 9)
    outs = []
    for layer, dv in ((cpu, torch.device("cpu")), (dev, device)):
        xi = x.to(dv).detach().requires_grad_()   # a leaf on each device
        y = layer(xi)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xi.grad, layer.values.grad, layer.bias.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b.cpu(), a, **TOL)
    # and the dense convolution with the same active taps
    torch.testing.assert_close(outs[1][0].cpu(), F.conv2d(x, cpu.to_dense().detach(), cpu.bias.detach(),
                                                          stride=stride, padding=padding), **TOL)


@pytest.mark.filterwarnings("ignore:regrow. sparsity=.* has no effect")
@pytest.mark.parametrize("model_name", ["vit", "resnet20"])
@pytest.mark.parametrize("method", ["rigl", "srigl", "dstee", "gse"])
def test_sparsified_zoo_model_trains_always_sparse_on_device(device, model_name, method):
    """regrow.nn.sparsify'd ViT (SparseMultiheadAttention, SparseLinear on tokens, patch
    SparseConv2d) and ResNet-20 (SparseConv2d) train on the device with the RigL family: counts
    kept, keys on the device, loss finite."""
    from gpu_helpers import CLASSES, MODEL_OPTIONS, batches
    from regrow.models import build
    from regrow.nn import sparsify
    torch.manual_seed(0)
    model = build(model_name, num_classes=CLASSES, in_shape=(3, 8, 8), **MODEL_OPTIONS[model_name])
    sparsify(model, 0.9, seed=1)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dst = regrow.DynamicSparsity(model, opt, method=method, sparsity=0.9, total_steps=7, update_interval=2,
                                 stop_fraction=1.0)
    assert dst.targets, "sparsify left no always-sparse layer"
    counts = [t.nnz for t in dst.targets]
    for x, y in batches(7, device):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        dst.step()
        for t, n in zip(dst.targets, counts):
            assert t.active_indices().device.type == device.type
            if method != "srigl":
                assert t.nnz == n
    assert dst.stats()["updates"] == 3
