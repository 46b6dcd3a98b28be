"""SparseConv2d's compiled kernels (regrow.nn._conv_kernels) against the layer's pure-torch route
and the masked dense convolution (F.conv2d with to_dense()'s kernel): forward, input gradient,
active-tap gradients, bias gradient; batch sizes on both sides of the 16-lane chunks, every
stride / padding / dilation; channels_last and strided inputs; the fallback when disabled."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import masked_conv_reference
from regrow.nn import SparseConv2d, _conv_kernels, sparse_conv

pytestmark = pytest.mark.skipif(_conv_kernels.load() is None,
                                reason=f"no compiled conv kernels: {_conv_kernels.unavailable_reason()}")


def _run(layer: SparseConv2d, x: torch.Tensor, grad_out: torch.Tensor, want_x=True, want_v=True):
    """(y, grad_x, grad_values, grad_bias) of the layer on its current route."""
    x = x.detach().clone().requires_grad_(want_x)
    layer.values.requires_grad_(want_v)
    y = layer(x)
    wanted = [t for t, on in ((x, want_x), (layer.values, want_v), (layer.bias, layer.bias is not None)) if on]
    grads = list(torch.autograd.grad(y, wanted, grad_out))
    out = [y.detach()]
    for on in (want_x, want_v, layer.bias is not None):
        out.append(grads.pop(0) if on else None)
    layer.values.requires_grad_(True)
    return out


def _torch_route(monkeypatch):
    monkeypatch.setattr(sparse_conv._conv_kernels, "load_for", lambda *tensors: None)


def _assert_all_close(got, want):
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(in_c=st.integers(1, 6), out_c=st.integers(1, 6), kh=st.integers(1, 3), kw=st.integers(1, 3),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2),
       dh=st.integers(1, 2), dw=st.integers(1, 2), batch=st.sampled_from([1, 3, 16, 17, 35]),
       extra_h=st.integers(0, 5), extra_w=st.integers(0, 9), density=st.floats(0.05, 1.0),
       bias=st.booleans(), seed=st.integers(0, 999))
def test_compiled_equals_torch_route_and_masked_conv(in_c, out_c, kh, kw, sh, sw, ph, pw, dh, dw, batch,
                                                     extra_h, extra_w, density, bias, seed):
    layer = SparseConv2d(in_c, out_c, (kh, kw), (sh, sw), (ph, pw), (dh, dw), bias=bias, density=density, seed=seed)
    h = max(1, dh * (kh - 1) + 1 - 2 * ph) + extra_h
    w = max(1, dw * (kw - 1) + 1 - 2 * pw) + extra_w
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_c, h, w, generator=gen)
    grad_out = torch.randn(batch, out_c, *layer.output_size(h, w), generator=gen)
    compiled = _run(layer, x, grad_out)
    assert compiled[2].shape == layer.values.shape   # active taps only
    _assert_all_close(compiled, masked_conv_reference(layer, x, grad_out))
    with pytest.MonkeyPatch.context() as mp:
        _torch_route(mp)
        _assert_all_close(compiled, _run(layer, x, grad_out))


def test_compiled_route_is_taken(monkeypatch):
    calls = []
    real_forward, real_backward = _conv_kernels.ConvKernels.forward, _conv_kernels.ConvKernels.backward
    monkeypatch.setattr(_conv_kernels.ConvKernels, "forward",
                        lambda self, *a: calls.append("forward") or real_forward(self, *a))
    monkeypatch.setattr(_conv_kernels.ConvKernels, "backward",
                        lambda self, *a: calls.append("backward") or real_backward(self, *a))
    layer = SparseConv2d(4, 5, 3, padding=1, density=0.3, seed=0)
    layer(torch.randn(16, 4, 6, 6, requires_grad=True)).sum().backward()
    assert calls == ["forward", "backward"]
    # float64 is not compiled: the torch route runs
    calls.clear()
    layer64 = SparseConv2d(4, 5, 3, padding=1, density=0.3, seed=0, dtype=torch.float64)
    layer64(torch.randn(2, 4, 6, 6, dtype=torch.float64)).sum().backward()
    assert calls == []


@pytest.mark.parametrize("layout", ["channels_last", "strided_slice"])
def test_non_nchw_inputs(layout):
    layer = SparseConv2d(6, 7, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), density=0.4, seed=2)
    gen = torch.Generator().manual_seed(0)
    if layout == "channels_last":
        x = torch.randn(17, 6, 9, 8, generator=gen).to(memory_format=torch.channels_last)
    else:   # every other sample and column of a bigger tensor: no unit stride anywhere
        x = torch.randn(34, 6, 9, 16, generator=gen)[::2, :, :, ::2]
    assert not x.is_contiguous()
    grad_out = torch.randn(17, 7, *layer.output_size(9, 8), generator=gen)
    _assert_all_close(_run(layer, x, grad_out), masked_conv_reference(layer, x.contiguous(), grad_out))


@pytest.mark.parametrize("want_x,want_v", [(True, False), (False, True)])
def test_one_gradient_only(want_x, want_v):
    """The backward's weight-gradient-only (a first layer) and input-gradient-only loops."""
    layer = SparseConv2d(5, 6, 3, padding=1, density=0.3, seed=4, bias=False)
    gen = torch.Generator().manual_seed(1)
    x, grad_out = torch.randn(19, 5, 7, 9, generator=gen), torch.randn(19, 6, 7, 9, generator=gen)
    got = _run(layer, x, grad_out, want_x=want_x, want_v=want_v)
    want = masked_conv_reference(layer, x, grad_out)
    _assert_all_close(got, [w if on else None for w, on in zip(want, (True, want_x, want_v, False))])


@pytest.mark.parametrize("batch,width", [(5, 6), (19, 13), (16, 16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layout_conversions_round_trip(batch, width, channels_last):
    """Exact copies both ways, through the 8 x 8 register transposes and the scalar tails."""
    kernels = _conv_kernels.load()
    x = torch.randn(batch, 3, 4, width)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x_p = kernels.to_batch_inner(x, (2, 1))
    assert x_p.shape == (3, 8, width + 2, batch)
    torch.testing.assert_close(x_p, F.pad(x, (1, 1, 2, 2)).permute(1, 2, 3, 0), rtol=0, atol=0)
    back = kernels.to_nchw(x_p, (2, 1))
    assert back.is_contiguous()
    torch.testing.assert_close(back, x, rtol=0, atol=0)


def test_disabled_kernels_fall_back_silently(monkeypatch):
    """REGROW_DISABLE_KERNEL=1: no kernels, no warning, and the layer still equals the masked conv."""
    monkeypatch.setenv("REGROW_DISABLE_KERNEL", "1")
    _conv_kernels.load.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _conv_kernels.load() is None
            assert "REGROW_DISABLE_KERNEL" in _conv_kernels.unavailable_reason()
            layer = SparseConv2d(3, 4, 3, stride=2, padding=1, density=0.5, seed=5)
            gen = torch.Generator().manual_seed(2)
            x, grad_out = torch.randn(16, 3, 7, 7, generator=gen), torch.randn(16, 4, 4, 4, generator=gen)
            _assert_all_close(_run(layer, x, grad_out), masked_conv_reference(layer, x, grad_out))
    finally:
        monkeypatch.delenv("REGROW_DISABLE_KERNEL")
        _conv_kernels.load.cache_clear()   # later tests load the real kernels (from the cache) again


def test_capture_on_the_compiled_route():
    """The armed step's captured inputs / output gradients (the growth machinery's view of the
    batch-innermost copy) are the call's own, and the tap gradients from them equal autograd's."""
    layer = SparseConv2d(4, 6, 3, stride=2, padding=1, density=0.3, seed=6)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(17, 4, 9, 7, generator=gen)
    grad_out = torch.randn(17, 6, *layer.output_size(9, 7), generator=gen)
    layer.arm_capture()
    try:
        y = layer(x)
        y.backward(grad_out)
        (cx, cdy), = layer.captured()
        torch.testing.assert_close(cx, x, rtol=0, atol=0)
        torch.testing.assert_close(cdy, grad_out, rtol=0, atol=0)
        got = sparse_conv.captured_tap_grads(layer, layer.row_indices, layer.col_indices)
        torch.testing.assert_close(got, layer.values.grad, rtol=1e-4, atol=1e-4)
        w = layer.to_dense().requires_grad_()
        gw, = torch.autograd.grad(F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation), [w], grad_out)
        torch.testing.assert_close(sparse_conv.captured_grad_rows(layer, 1, 4), gw[1:4].reshape(3, -1),
                                   rtol=1e-4, atol=1e-4)
    finally:
        layer.disarm_capture()


def test_results_do_not_depend_on_the_thread_count():
    """Every output and gradient entry is summed by one thread in a fixed order: 1 and 2 threads
    give the same bits (runs are reproducible whatever torch.set_num_threads says)."""
    layer = SparseConv2d(6, 8, 3, padding=1, density=0.4, seed=7)
    gen = torch.Generator().manual_seed(4)
    x, grad_out = torch.randn(33, 6, 10, 9, generator=gen), torch.randn(33, 8, 10, 9, generator=gen)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run(layer, x, grad_out))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)
