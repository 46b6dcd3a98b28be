"""CondensedLinear and CSRLinear compute exactly what the masked dense layer computes."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from regrow.nn import CondensedLinear, CSRLinear
from regrow.nn import _kernels
from regrow.nn.condensed import has_constant_fan_in, index_dtype_for

TOL = dict(rtol=1e-5, atol=1e-5)


def constant_fan_in(out_f, in_f, k, dead=(), seed=0):
    """A random mask with exactly k active inputs per row, except all-False rows ``dead``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    for r in range(out_f):
        if r not in dead:
            mask[r, torch.randperm(in_f, generator=g)[:k]] = True
    return mask


def layer_data(out_f, in_f, k, dead=(), seed=0, bias=True):
    g = torch.Generator().manual_seed(seed + 1)
    mask = constant_fan_in(out_f, in_f, k, dead, seed)
    # scaled like a trained layer, so outputs are O(1) and 1e-5 is a meaningful tolerance
    w = torch.randn(out_f, in_f, generator=g) / max(k, 1) ** 0.5
    b = torch.randn(out_f, generator=g) if bias else None
    return w, mask, b


@pytest.fixture(scope="session")
def kernel():
    """The compiled kernel, built once per session (well under a second with gcc)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kern = _kernels.load()
    if kern is None:
        pytest.skip(f"compiled kernel unavailable: {_kernels.unavailable_reason()}")
    return kern


SHAPES = [  # out, in, k, ablated rows
    (1, 1, 1, ()),
    (7, 13, 3, (2,)),
    (64, 100, 10, (0, 5, 63)),
    (128, 300, 37, ()),        # k not a multiple of 8: vector loop + scalar tail
    (16, 50, 50, (3,)),        # dense rows
    (33, 40000, 5, (1,)),      # more than 32768 inputs: int32 indices
    (256, 512, 64, (9,)),      # enough work for the parallel path
]
BATCHES = [1, 2, 3, 17, 40]     # per-sample kernel, tile16 (+ partial tile), tile32 (+ partial)


@pytest.mark.parametrize("out_f,in_f,k,dead", SHAPES)
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_condensed_equals_masked_dense(out_f, in_f, k, dead, backend, request):
    if backend == "kernel":
        request.getfixturevalue("kernel")
    w, mask, b = layer_data(out_f, in_f, k, dead)
    layer = CondensedLinear.from_dense(w, mask, b)
    layer.backend = backend
    assert layer.index_dtype == (torch.int16 if in_f <= 32768 else torch.int32)
    for batch in BATCHES:
        x = torch.randn(batch, in_f)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, w * mask, b), **TOL)


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("threads", [1, 2])
def test_index_dtypes_and_threads(index_dtype, threads):
    torch.set_num_threads(threads)  # the conftest fixture restores one thread
    w, mask, b = layer_data(96, 700, 40, dead=(4, 50))
    layer = CondensedLinear.from_dense(w, mask, b, index_dtype=index_dtype)
    assert layer.indices.dtype == index_dtype
    for batch in (1, 5, 33):
        x = torch.randn(batch, 700)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, w * mask, b), **TOL)


def test_int16_refuses_too_many_inputs():
    with pytest.raises(ValueError, match="int16"):
        CondensedLinear(40000, 4, 2, index_dtype=torch.int16)
    assert index_dtype_for(32768) == torch.int16 and index_dtype_for(32769) == torch.int32


@given(out_f=st.integers(1, 40), in_f=st.integers(1, 90), k_frac=st.floats(0.0, 1.0),
       n_dead=st.integers(0, 5), batch=st.integers(1, 40), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_condensed_property(out_f, in_f, k_frac, n_dead, batch, bias, seed):
    k = max(1, round(k_frac * in_f))
    dead = tuple(range(min(n_dead, out_f)))
    w, mask, b = layer_data(out_f, in_f, k, dead, seed, bias)
    layer = CondensedLinear.from_dense(w, mask, b)
    assert torch.equal(layer.to_dense(), w * mask)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(seed))
    ref = F.linear(x, w * mask, b)
    for backend in ("auto", "torch"):
        layer.backend = backend
        with torch.no_grad():
            torch.testing.assert_close(layer(x), ref, **TOL)


def test_ablated_rows_kept_in_place_output_the_bias(kernel):
    w, mask, b = layer_data(10, 20, 4, dead=(0, 3, 9))
    layer = CondensedLinear.from_dense(w, mask, b)
    assert layer.rows == 7 and layer.row_index.tolist() == [1, 2, 4, 5, 6, 7, 8]
    with torch.no_grad():
        y = layer(torch.randn(6, 20))
    assert torch.equal(y[:, [0, 3, 9]], b[[0, 3, 9]].expand(6, 3))


def test_uneven_fan_in_is_padded():
    w = torch.randn(5, 12)
    mask = torch.rand(5, 12) < 0.4
    mask[0] = False
    mask[1, :] = True
    layer = CondensedLinear.from_dense(w, mask, None)
    assert layer.fan_in == 12 and not has_constant_fan_in(mask)
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, w * mask), **TOL)


def test_leading_dimensions_and_empty_batch():
    w, mask, b = layer_data(8, 16, 4)
    layer = CondensedLinear.from_dense(w, mask, b)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, w * mask, b), **TOL)
        assert layer(torch.randn(0, 16)).shape == (0, 8)
    with pytest.raises(ValueError, match="last dimension 16"):
        layer(torch.randn(2, 15))


def test_autograd_through_torch_path():
    w, mask, b = layer_data(12, 30, 6, dead=(2,))
    layer = CondensedLinear.from_dense(w, mask, b)
    layer.weight.requires_grad_(True)
    x = torch.randn(4, 30, requires_grad=True)
    layer(x).square().sum().backward()
    dense_w = (w * mask).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, dense_w, b).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    # the condensed weight's gradient is the dense gradient at the stored (active) positions
    rows = layer.row_index
    expected = dense_w.grad[rows].gather(1, layer.indices.long())
    torch.testing.assert_close(layer.weight.grad, expected, **TOL)


def test_kernel_backend_refuses_what_it_cannot_run(kernel):
    w, mask, b = layer_data(4, 8, 2)
    layer = CondensedLinear.from_dense(w.double(), mask, b.double())
    layer.backend = "kernel"
    with pytest.raises(RuntimeError, match="cannot run"):
        layer(torch.randn(2, 8, dtype=torch.float64))
    layer.backend = "auto"
    torch.testing.assert_close(layer(torch.ones(1, 8, dtype=torch.float64)),
                               F.linear(torch.ones(1, 8, dtype=torch.float64), (w * mask).double(), b.double()))


def test_kernel_only_sees_contiguous_cpu_tensors(kernel):
    w, mask, b = layer_data(24, 40, 6, dead=(3,))
    x = torch.randn(5, 40)
    ref = F.linear(x, w * mask, b)
    layer = CondensedLinear.from_dense(w, mask, b)
    assert layer._kernel_applies(x)
    # a layer on another device (meta here, CUDA elsewhere) with a CPU input: its pointers are
    # not host memory, so the kernel must never get them
    assert not layer.to("meta")._kernel_applies(x)
    # same values, transposed strides: the kernel would read them in the wrong order
    layer = CondensedLinear.from_dense(w, mask, b)
    with torch.no_grad():
        layer.weight.data = layer.weight.data.t().contiguous().t()
        layer.indices.data = layer.indices.data.t().contiguous().t()
    assert not layer.weight.is_contiguous() and not layer._kernel_applies(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, **TOL)
    layer = CondensedLinear.from_dense(w, mask, b)
    layer.bias.data = torch.stack([b, b], 1)[:, 0]   # a strided bias view
    assert not layer._kernel_applies(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, **TOL)


def test_state_dict_round_trip_and_validation():
    w, mask, b = layer_data(20, 50, 5, dead=(7,))
    layer = CondensedLinear.from_dense(w, mask, b)
    fresh = CondensedLinear(50, 20, 5, rows=19)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.to_dense(), w * mask)
    bad = layer.state_dict()
    bad["indices"] = bad["indices"].clone()
    bad["indices"][0, 0] = 50  # one past the last input: the kernel would read out of bounds
    with pytest.raises(ValueError, match="out of range"):
        fresh.load_state_dict(bad)


def test_fallback_when_the_kernel_cannot_build(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("REGROW_CACHE_DIR", str(tmp_path))
    _kernels.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="condensed kernel unavailable"):
            assert _kernels.load() is None
        assert "no-such-compiler" in _kernels.unavailable_reason()
        w, mask, b = layer_data(16, 40, 8)
        layer = CondensedLinear.from_dense(w, mask, b)
        x = torch.randn(3, 40)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, w * mask, b), **TOL)
    finally:
        _kernels.load.cache_clear()  # later tests load the real kernel (from its cache) again


# -- CSR -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_f,in_f,density", [(1, 1, 1.0), (30, 70, 0.1), (64, 128, 0.02), (8, 9, 0.0)])
def test_csr_equals_masked_dense(out_f, in_f, density):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out_f, in_f, generator=g)
    mask = torch.rand(out_f, in_f, generator=g) < density
    for b in (torch.randn(out_f, generator=g), None):
        layer = CSRLinear.from_dense(w, mask, b)
        assert layer.nnz == int(mask.sum())
        assert torch.equal(layer.to_dense(), w * mask)
        for batch in (1, 7):
            x = torch.randn(batch, in_f, generator=g)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), F.linear(x, w * mask, b), **TOL)


def test_csr_state_dict_round_trip_and_validation():
    w = torch.randn(6, 10)
    mask = torch.rand(6, 10) < 0.3
    layer = CSRLinear.from_dense(w, mask, torch.randn(6))
    fresh = CSRLinear(10, 6, layer.nnz)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.to_dense(), w * mask)
    bad = layer.state_dict()
    bad["crow_indices"] = bad["crow_indices"].flip(0).contiguous()
    with pytest.raises(ValueError, match="row-pointer"):
        fresh.load_state_dict(bad)
