"""SparseConv2d against the dense convolution it stands for (F.conv2d with to_dense()'s kernel,
i.e. a masked nn.Conv2d): forward, input gradient, active-tap gradients; and that nothing of the
dense kernel's size is ever created."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import regrow
from helpers import LargestTensor, masked_conv_reference
from regrow.nn import SparseConv2d


@settings(max_examples=30, deadline=None)
@given(in_c=st.integers(1, 5), out_c=st.integers(1, 5), kh=st.integers(1, 3), kw=st.integers(1, 3),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2),
       dh=st.integers(1, 2), dw=st.integers(1, 2), batch=st.integers(1, 3), extra_h=st.integers(0, 4),
       extra_w=st.integers(0, 4), density=st.floats(0.05, 1.0), bias=st.booleans(),
       channels_last=st.booleans(), seed=st.integers(0, 999))
def test_matches_masked_dense_conv(in_c, out_c, kh, kw, sh, sw, ph, pw, dh, dw, batch, extra_h, extra_w,
                                   density, bias, channels_last, seed):
    layer = SparseConv2d(in_c, out_c, (kh, kw), (sh, sw), (ph, pw), (dh, dw), bias=bias, density=density, seed=seed)
    # the smallest input the kernel fits, plus a little
    h = max(1, dh * (kh - 1) + 1 - 2 * ph) + extra_h
    w = max(1, dw * (kw - 1) + 1 - 2 * pw) + extra_w
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_c, h, w, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = layer(x)
    grad_out = torch.randn(y.shape, generator=gen)
    y_ref, gx_ref, gv_ref, gb_ref = masked_conv_reference(layer, x, grad_out)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(y, [x, layer.values] + ([layer.bias] if bias else []), grad_out)
    torch.testing.assert_close(grads[0], gx_ref, rtol=1e-4, atol=1e-4)
    assert grads[1].shape == layer.values.shape   # active taps only: no dense weight gradient
    torch.testing.assert_close(grads[1], gv_ref, rtol=1e-4, atol=1e-4)
    if bias:
        torch.testing.assert_close(grads[2], gb_ref, rtol=1e-4, atol=1e-4)


def test_gradcheck_float64():
    layer = SparseConv2d(3, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), density=0.4,
                         seed=3, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)

    def run(x, values, bias):
        return regrow.nn.sparse_conv._SparseConv2dFunction.apply(
            x, values, bias, layer.topology(), layer.stride, layer.padding, layer.dilation,
            layer.output_size(5, 6), None)

    values = layer.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (x, values, bias))


def test_no_dense_kernel_sized_tensor_in_forward_or_backward():
    # out x in = 1024 and the dense kernel 25600; the input (800), output, N (256) are smaller
    # than even one offset's dense [out, in] slice, so any dense kernel (or slice) would show
    layer = SparseConv2d(32, 32, 5, fan_in=8, seed=1)
    layer.topology()   # built outside: the index structures are N-sized anyway
    x = torch.randn(1, 32, 5, 5, requires_grad=True)
    sizes = LargestTensor()
    with sizes:
        y = layer(x)
        y.sum().backward()
    assert 0 < sizes.numel < 32 * 32
    assert layer.values.grad.shape == (256,) and x.grad.shape == x.shape
    dense = 32 * 32 * 25
    assert all(t.numel() < dense for t in list(layer.parameters()) + list(layer.buffers()))


def test_groups_and_string_padding_refused():
    with pytest.raises(NotImplementedError, match="groups=1"):
        SparseConv2d(4, 4, 3, groups=2, density=0.5)
    with pytest.raises(ValueError, match="padding"):
        SparseConv2d(4, 4, 3, padding="same", density=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        SparseConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="fan_in"):
        SparseConv2d(2, 4, 3, fan_in=19)   # 2 * 3 * 3 = 18 taps per channel
    with pytest.raises(ValueError, match="too small"):
        SparseConv2d(2, 4, 5, density=0.5)(torch.randn(1, 2, 3, 3))


@pytest.mark.parametrize("kwargs", [{"fan_in": 7}, {"density": 0.3}])
def test_init_constant_fan_in_seeded_and_bounded(kwargs):
    layer = SparseConv2d(4, 6, 3, seed=5, **kwargs)
    counts = torch.bincount(layer.row_indices.long(), minlength=6)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == layer.nnz
    if "fan_in" in kwargs:
        assert counts.tolist() == [7] * 6
    keys = layer.active_keys()
    assert torch.equal(keys, keys.unique())   # sorted, distinct
    dense = layer.to_dense()
    assert dense.shape == (6, 4, 3, 3)
    assert torch.equal(dense.reshape(-1).nonzero().squeeze(1), keys[layer.values.detach().reshape(-1) != 0])
    bound = 1 / (layer.nnz / 6) ** 0.5
    assert layer.values.abs().max() <= bound and layer.bias.abs().max() <= bound
    twin = SparseConv2d(4, 6, 3, seed=5, **kwargs)
    assert torch.equal(twin.values, layer.values) and torch.equal(twin.col_indices, layer.col_indices)
    assert not torch.equal(SparseConv2d(4, 6, 3, seed=6, **kwargs).col_indices, layer.col_indices)
    assert f"nnz={layer.nnz}" in repr(layer)


def test_from_dense_and_to_conv2d_round_trip():
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 3, 3)
    mask = torch.rand(5, 3, 3, 3) < 0.3
    bias = torch.randn(5)
    layer = SparseConv2d.from_dense(weight, bias, mask, stride=2, padding=1)
    assert layer.nnz == int(mask.sum())
    torch.testing.assert_close(layer.to_dense(), weight * mask)
    conv = layer.to_conv2d()
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_load_state_dict_with_a_different_nnz():
    source = SparseConv2d(3, 4, 3, padding=1, density=0.2, seed=1)
    target = SparseConv2d(3, 4, 3, padding=1, density=0.6, seed=2)
    target.load_state_dict(source.state_dict())
    assert target.nnz == source.nnz
    torch.testing.assert_close(target.to_dense(), source.to_dense())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(target(x), source(x))
    target(x).sum().backward()   # the resized parameter trains
    assert target.values.grad.shape == (source.nnz,)
    # loaded over a layer that holds a gradient (no zero_grad in between): the stale gradient goes
    other = SparseConv2d(3, 4, 3, padding=1, density=0.9, seed=3)
    target.load_state_dict(other.state_dict())
    assert target.values.grad is None
    target(x).sum().backward()
    assert target.values.grad.shape == (other.nnz,)


def test_stacked_layers_with_inplace_activation_train():
    """The channel-major output feeds a second layer and an in-place ReLU; one SGD step on both
    equals the same step on the masked dense convolutions."""
    torch.manual_seed(0)
    a = SparseConv2d(3, 6, 3, padding=1, density=0.5, seed=1)
    b = SparseConv2d(6, 2, 3, stride=2, density=0.5, seed=2)
    x = torch.randn(2, 3, 8, 8)
    ca, cb = a.to_conv2d(), b.to_conv2d()
    out = b(torch.relu_(a(x)))
    ref = cb(torch.relu_(ca(x)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for sparse, dense in ((a, ca), (b, cb)):
        g = dense.weight.grad.reshape(dense.out_channels, -1)
        torch.testing.assert_close(sparse.values.grad, g[sparse.row_indices.long(), sparse.col_indices.long()],
                                   rtol=1e-4, atol=1e-5)


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(SparseConv2d(3, 6, 3, padding=1, density=0.3, seed=1), torch.nn.ReLU(),
                               SparseConv2d(6, 4, 3, stride=2, density=0.3, seed=2), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 3 * 3, 2))


@pytest.mark.parametrize("format", ["dense", "condensed", "csr"])
def test_export_gives_masked_conv2d_with_the_same_outputs(format):
    model = _small_cnn()
    out = regrow.export(model, {}, format=format)
    assert not any(isinstance(m, SparseConv2d) for m in out.modules())
    convs = [m for m in out.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2
    torch.testing.assert_close(convs[0].weight, model[0].to_dense())
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
