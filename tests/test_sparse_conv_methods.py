"""Every method that runs on SparseLinear runs on SparseConv2d, with the masked backend's
decisions: the same conv layer built both ways (nn.Conv2d + mask, SparseConv2d.from_dense),
the same batch and seed, one topology update after another, the same dropped and grown taps
and the same values. Plus the capture the backend reads, its gradients against the dense
kernel gradient, optimizer state, counts and seeds."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import regrow
from helpers import LargestTensor, update_once
from regrow.backends.masked import MaskedTarget
from regrow.backends.sparse import SparseConv2dTarget
from regrow.core.optim_state import OptimizerStateMasker
from regrow.methods import UpdateContext, make_method
from regrow.nn import SparseConv2d

GEOMETRIES = [dict(stride=1, padding=1, dilation=1), dict(stride=2, padding=(0, 2), dilation=(1, 2))]


def dense_kernel_grad(layer: SparseConv2d, calls) -> torch.Tensor:
    """dL/dW of the dense kernel [out, in * kh * kw] by autograd through F.conv2d."""
    w = layer.to_dense().requires_grad_()
    loss = sum((F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation) * g).sum() for x, g in calls)
    loss.backward()
    return w.grad.reshape(layer.out_channels, -1)


# -- the capture and the gradients read from it --------------------------------------------------
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_capture_keeps_the_armed_steps_inputs_and_output_gradients(geometry):
    torch.manual_seed(0)
    layer = SparseConv2d(3, 5, (3, 2), density=0.3, seed=1, dtype=torch.float64, **geometry)
    xs = [torch.randn(4, 3, 9, 8, dtype=torch.float64), torch.randn(2, 3, 7, 9, dtype=torch.float64)]
    layer(xs[0]).sum().backward()
    assert layer.captured() is None, "nothing is kept when not armed"
    layer.arm_capture()
    with torch.no_grad():
        layer(xs[0])   # an evaluation pass is not the update batch
    ys = [layer(x) for x in xs]
    assert layer.captured() is None, "no output gradient yet: incomplete"
    gs = [torch.randn_like(y) for y in ys]
    sum((y * g).sum() for y, g in zip(ys, gs)).backward()
    captured = layer.captured()
    assert len(captured) == 2
    for (x, g), (cx, cg) in zip(zip(xs, gs), captured):
        assert torch.equal(cx, x) and torch.equal(cg, g)
    layer.disarm_capture()
    assert layer.captured() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_grad_at_and_grad_rows_equal_the_dense_kernel_gradient(geometry, dtype):
    torch.manual_seed(1)
    layer = SparseConv2d(4, 6, 3, density=0.2, seed=2, dtype=dtype, **geometry)
    t = SparseConv2dTarget("conv.values", layer, OptimizerStateMasker(torch.optim.SGD(layer.parameters(), lr=0.1)))
    xs = [torch.randn(3, 4, 10, 9, dtype=dtype), torch.randn(2, 4, 8, 8, dtype=dtype)]
    t.arm_capture()
    ys = [layer(x) for x in xs]
    gs = [torch.randn_like(y) for y in ys]
    sum((y * g).sum() for y, g in zip(ys, gs)).backward()
    dense = dense_kernel_grad(layer, list(zip(xs, gs)))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    flat = torch.randint(t.numel, (300,))   # unsorted, repeats, active and inactive taps
    torch.testing.assert_close(t.grad_at(flat), dense.reshape(-1)[flat], **tol)
    torch.testing.assert_close(t.grad_rows(2, 5), dense[2:5], **tol)
    torch.testing.assert_close(layer.values.grad, t.grad_at(t.active_indices()), **tol)
    t.release()
    assert not t.grad_available()
    with pytest.raises(RuntimeError, match="no inputs/output gradients were captured for 'conv.values'"):
        t.grad_at(flat)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), in_c=st.integers(1, 5), out_c=st.integers(1, 6), kh=st.integers(1, 4),
       kw=st.integers(1, 4), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)), dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       batch=st.integers(1, 4), calls=st.integers(1, 2), block=st.integers(1, 6))
def test_captured_gradients_equal_autograd_on_random_geometries(seed, in_c, out_c, kh, kw, stride, padding, dilation,
                                                                 batch, calls, block):
    gen = torch.Generator().manual_seed(seed)
    layer = SparseConv2d(in_c, out_c, (kh, kw), stride, padding, dilation, density=0.5, seed=seed % 1000,
                         dtype=torch.float64)
    t = SparseConv2dTarget("conv.values", layer, OptimizerStateMasker(torch.optim.SGD(layer.parameters(), lr=0.1)))
    size = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)   # the smallest input the kernel fits
    xs = [torch.randn(batch, in_c, size[0] + i, size[1] + 2 * i, generator=gen, dtype=torch.float64)
          for i in range(calls)]
    t.arm_capture()
    ys = [layer(x) for x in xs]
    gs = [torch.randn(y.shape, generator=gen, dtype=torch.float64) for y in ys]
    sum((y * g).sum() for y, g in zip(ys, gs)).backward()
    dense = dense_kernel_grad(layer, list(zip(xs, gs)))
    flat = torch.randint(t.numel, (40,), generator=gen)
    torch.testing.assert_close(t.grad_at(flat), dense.reshape(-1)[flat], atol=1e-10, rtol=1e-10)
    start = int(torch.randint(out_c, (1,), generator=gen))
    stop = min(out_c, start + block)
    torch.testing.assert_close(t.grad_rows(start, stop), dense[start:stop], atol=1e-10, rtol=1e-10)


def test_grad_at_never_builds_the_dense_kernel_gradient():
    layer = SparseConv2d(32, 32, 5, fan_in=8, seed=1)
    t = SparseConv2dTarget("conv.values", layer, OptimizerStateMasker(torch.optim.SGD(layer.parameters(), lr=0.1)))
    t.arm_capture()
    layer(torch.randn(1, 32, 5, 5)).sum().backward()
    flat = torch.randint(t.numel, (200,))   # 200 taps of the 25600 of the dense kernel
    sizes = LargestTensor()
    with sizes:
        t.grad_at(flat)
    # one offset's slice of the asked channels (<= 32 x 1) and the 200 taps: far below out x in
    assert 0 < sizes.numel < 32 * 32
    with sizes:
        block = t.grad_rows(0, 2)
    assert block.shape == (2, 32 * 25) and sizes.numel <= 2 * 32 * 25


# -- the same decisions as the masked backend ----------------------------------------------------
def twin_targets(seed: int, geometry: dict, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), dtype=torch.float64):
    """One conv layer two ways: SparseConv2d (from_dense of a masked random kernel) and an
    nn.Conv2d whose masked-backend target has the same mask; float64 by default, so no near-ties
    (float32 on the CPU takes the compiled kernels' route)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 4, 3, 3, generator=gen, dtype=dtype)
    mask = torch.rand(weight.shape, generator=gen) < 0.3
    layer = SparseConv2d.from_dense(weight, None, mask, **geometry)
    conv = nn.Conv2d(4, 6, 3, bias=False, dtype=dtype, **geometry)
    with torch.no_grad():
        conv.weight.copy_(weight * mask)
    opt_s, opt_m = optimizer(layer.parameters()), optimizer(conv.parameters())
    # one name for both: methods keep per-layer state by target name (SRigL's budgets)
    t_s = SparseConv2dTarget("conv.w", layer, OptimizerStateMasker(opt_s))
    t_m = MaskedTarget("conv.w", conv.weight, conv, layer.nnz, OptimizerStateMasker(opt_m))
    t_m.set_mask(mask.reshape(6, -1))
    return (layer, t_s, opt_s), (conv, t_m, opt_m)


# SET grows at random values by default, drawn with each backend's own init bound (a masked
# conv's dense fan-in, a SparseConv2d's mean active fan-in): zero growth compares the values
METHODS = [("set", {"grow_init": "zero"}), ("gse", {"sampling": "uniform"}), ("gse", {"sampling": "grabo", "gamma": 0.5}),
           ("gse", {"sampling": "graest"}), ("rigl", {}), ("dstee", {"c": 0.05}), ("mest", {}), ("cht", {}),
           ("srigl", {}), ("srigl", {"exempt_layers": (), "gamma_sal": 0.9})]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("method_name, options", METHODS)
def test_every_sparse_method_makes_the_masked_backends_decisions_on_a_conv(method_name, options, geometry):
    check_same_decisions(method_name, options, geometry, torch.float64)


@pytest.mark.parametrize("method_name, options", [("rigl", {}), ("gse", {"sampling": "grabo"}), ("srigl", {})])
def test_the_compiled_float32_route_makes_the_same_decisions(method_name, options):
    check_same_decisions(method_name, options, GEOMETRIES[1], torch.float32)


def check_same_decisions(method_name: str, options: dict, geometry: dict, dtype: torch.dtype) -> None:
    """Three updates of the twin layers on the same batches and seeds: equal topology and values
    after each, N kept (SRigL: constant taps per channel), the same ever-active count."""
    (layer, t_s, _), (conv, t_m, _) = twin_targets(3, geometry, dtype=dtype)
    methods = [make_method(method_name, options), make_method(method_name, options)]
    for method in methods:   # both start from the SparseConv2d's own budget and fan-in
        method.attach([t_s])
    gen = torch.Generator().manual_seed(0)
    ablated = 0
    for update in range(1, 4):
        x = torch.randn(3, 4, 9, 9, generator=gen, dtype=dtype)
        g = torch.randn(layer(x).shape, generator=gen, dtype=dtype)
        before = set(t_s.active_indices().tolist())
        for lay, tgt, method in ((layer, t_s, methods[0]), (conv, t_m, methods[1])):
            ctx = UpdateContext(step=10 * update, fraction=0.3, generator=torch.Generator().manual_seed(update), seed=7)
            update_once(lay, tgt, method, x, g, ctx)
        after_s, after_m = set(t_s.active_indices().tolist()), set(t_m.active_indices().tolist())
        assert after_s == after_m, f"update {update}: the backends chose different taps"
        if method_name == "srigl":   # constant fan-in: every surviving channel has the same taps
            counts = t_s.row_counts()
            assert bool(((counts == 0) | (counts == counts.max())).all())
            ablated += int((counts == 0).sum())
        else:
            k = int(0.3 * len(before))
            assert len(after_s) == len(before) == layer.nnz and len(after_s - before) == k > 0
        assert after_s != before
        torch.testing.assert_close(layer.to_dense(), conv.weight.detach(), atol=0, rtol=0)
    assert t_s.ever_active_count() == t_m.ever_active_count()
    if options.get("gamma_sal") == 0.9:
        assert ablated > 0, "the test should exercise ablation"


def test_rigl_grows_the_top_gradients_of_a_sparse_conv():
    """Against an independent reference: the dense kernel gradient by autograd, top-k inactive."""
    (layer, t_s, _), _ = twin_targets(4, GEOMETRIES[1])
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    g = torch.randn(layer(x).shape, dtype=torch.float64)
    t_s.arm_capture()
    layer(x).backward(g)
    before = layer.active_keys().clone()
    k = int(0.5 * layer.nnz)
    score = dense_kernel_grad(layer, [(x, g)]).abs().reshape(-1)
    score[before] = -1
    make_method("rigl", {}).update(t_s, UpdateContext(step=1, fraction=0.5, generator=torch.Generator(), seed=1))
    grown = set(layer.active_keys().tolist()) - set(before.tolist())
    assert grown == set(torch.topk(score, k).indices.tolist())


def test_rewire_reindexes_optimizer_state_as_the_masked_backend_zeroes_it():
    adam = lambda p: torch.optim.Adam(p, lr=0.01)   # noqa: E731
    (layer, t_s, opt_s), (conv, t_m, opt_m) = twin_targets(5, GEOMETRIES[0], adam)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    g = torch.randn(layer(x).shape, dtype=torch.float64)
    for lay, tgt, opt in ((layer, t_s, opt_s), (conv, t_m, opt_m)):
        lay(x).backward(g)
        tgt.mask_grad()
        opt.step()
        tgt.apply_mask()
        opt.zero_grad()
        tgt.arm_capture()
        lay(x).backward(g)
        tgt.snapshot_grad()
        make_method("rigl", {}).update(tgt, UpdateContext(step=1, fraction=0.4, generator=torch.Generator(), seed=2))
    assert set(t_s.active_indices().tolist()) == set(t_m.active_indices().tolist())
    for key in ("exp_avg", "exp_avg_sq"):
        sparse_state = opt_s.state[layer.values][key]
        assert sparse_state.shape == layer.values.shape
        dense_view = torch.zeros(t_s.numel, dtype=torch.float64)
        dense_view[t_s.active_indices()] = sparse_state
        masked_state = opt_m.state[conv.weight][key].reshape(-1) * t_m.mask.reshape(-1)
        # equal up to the round-off of two ways of computing one gradient; zero where inactive
        torch.testing.assert_close(dense_view, masked_state, atol=1e-12, rtol=1e-9)
        assert torch.equal(dense_view != 0, masked_state != 0)
    # gradients travel with their taps too; grown taps have none
    assert layer.values.grad.shape == layer.values.shape


# -- through DynamicSparsity -----------------------------------------------------------------------
def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(SparseConv2d(3, 8, 3, padding=1, density=0.3, seed=1), nn.BatchNorm2d(8), nn.ReLU(),
                         SparseConv2d(8, 8, 3, stride=2, padding=1, density=0.3, seed=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def train(method: str, seed: int, steps: int = 6, **options):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = regrow.DynamicSparsity(model, opt, method=method, sparsity=0.7, total_steps=40, update_interval=2,
                                 seed=seed, **options)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    start = [model[i].active_keys().clone() for i in (0, 3)]
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        dst.step()
    return model, dst, start


@pytest.mark.parametrize("method, options", [("set", {}), ("gse", {"sampling": "graest"}), ("rigl", {}),
                                             ("dstee", {}), ("srigl", {"gamma_sal": 0.9}), ("mest", {})])
def test_dynamic_sparsity_rewires_sparse_convs_reproducibly(method, options):
    model, dst, start = train(method, seed=1, **options)
    assert dst.stats()["updates"] == 3
    names = ("0.values", "3.values")
    for i, name, before in zip((0, 3), names, start):
        conv = model[i]
        assert not torch.equal(conv.active_keys(), before), f"{method} rewired nothing in {name}"
        assert dst.stats()["layers"][name]["nnz"] == conv.nnz
        if method != "srigl":
            assert conv.nnz == before.numel()
        assert dst.last_update["layers"][name]
    again, _, _ = train(method, seed=1, **options)
    other, _, _ = train(method, seed=2, **options)
    for i in (0, 3):
        assert torch.equal(again[i].active_keys(), model[i].active_keys())
        assert torch.equal(again[i].values, model[i].values)
    assert any(not torch.equal(other[i].active_keys(), model[i].active_keys()) for i in (0, 3))


def test_static_keeps_the_sparse_convs_topology():
    model, dst, start = train("static", seed=1)
    for i, before in zip((0, 3), start):
        assert torch.equal(model[i].active_keys(), before)
    assert dst.stats()["updates"] == 0


@pytest.mark.parametrize("method, reason", [("dense", "trains every weight densely"),
                                            ("gmp", "starts from dense weights"), ("snfs", "smooths the dense gradient"),
                                            ("topkast", ""), ("snip", "prunes a dense network")])
def test_methods_the_sparse_backend_refuses_are_refused_for_sparse_convs(method, reason):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=f"{reason}.*always-sparse layers.*'0.values'"):
        regrow.DynamicSparsity(model, opt, method=method, sparsity=0.9, total_steps=100, update_interval=10)
