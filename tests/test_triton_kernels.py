"""SparseLinear's Triton kernels (the CUDA route), checked on the CPU by Triton's interpreter.

Skipped where Triton is not installed (the CPU test environment does not need it); the GPU
suite (tests/gpu) runs the same layer on CUDA, where these kernels are the default route.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

# Triton reads TRITON_INTERPRET when it is first imported (conftest sets it on machines without
# a GPU, before any test imports Triton)
if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not importable here (tests/test_triton_isolated.py runs this file with "
                "the copy `make test` installs)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton's interpreter is off (a GPU machine: tests/gpu checks the kernels there)",
                allow_module_level=True)
pytest.importorskip("triton")

from regrow.nn import SparseLinear, _sparse_kernels, _triton_kernels  # noqa: E402
from regrow.nn.sparse_linear import sampled_grad  # noqa: E402


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    """Triton's interpreter on CPU tensors, the compiled C kernels off (they would run first)."""
    monkeypatch.setenv("REGROW_CUDA_SPARSE", "triton")
    monkeypatch.setattr(_sparse_kernels, "load", lambda: None)
    monkeypatch.setattr(_triton_kernels, "_KERNELS", None)   # jit under the interpreter
    # the interpreter's scalars are 1-element arrays, and its ``int(array)`` (loop bounds read
    # from memory) fails on NumPy >= 2.4 (ndim > 0); read the one element instead
    from triton.runtime import interpreter
    set_attr = interpreter._LangPatchScope.set_attr

    def set_attr_reading_one_element(self, obj, name, value):
        if name == "__index__":
            value = lambda t: int(t.handle.data.reshape(-1)[0])  # noqa: E731
        set_attr(self, obj, name, value)
    monkeypatch.setattr(interpreter._LangPatchScope, "set_attr", set_attr_reading_one_element)


def _random_csr(rows, cols, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    r, c = mask.nonzero(as_tuple=True)
    counts = torch.bincount(r, minlength=rows)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    values = torch.randn(r.numel(), generator=g)
    return ptr, r.to(torch.int32), c.to(torch.int32), values


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), batch=st.integers(1, 140),
       density=st.floats(0.0, 1.0), bias=st.booleans(), seed=st.integers(0, 100))
def test_spmm_rows_equals_the_dense_product(rows, cols, batch, density, bias, seed):
    ptr, r, c, values = _random_csr(rows, cols, density, seed)
    dense = torch.zeros(rows, cols)
    dense[r.long(), c.long()] = values
    src = torch.randn(cols, batch)
    b = torch.randn(rows) if bias else None
    want = dense @ src + (b[:, None] if bias else 0)
    torch.testing.assert_close(_triton_kernels.spmm_rows(ptr, c, values, None, src, b), want,
                               rtol=1e-5, atol=1e-5)


def test_spmm_rows_through_a_permutation_is_the_transposed_product():
    ptr, r, c, values = _random_csr(30, 20, 0.3, 1)
    dense = torch.zeros(30, 20)
    dense[r.long(), c.long()] = values
    perm = torch.sort(c, stable=True).indices              # CSC order, as _Topology.csc builds it
    counts = torch.bincount(c.long(), minlength=20)
    ccol = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    g = torch.randn(30, 9)
    got = _triton_kernels.spmm_rows(ccol, r[perm], values, perm.to(torch.int32), g, None)
    torch.testing.assert_close(got, dense.t() @ g, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 70), batch=st.integers(1, 300), seed=st.integers(0, 100))
def test_sddmm_equals_the_dense_gradient_at_the_pairs(n, batch, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(12, batch, generator=g), torch.randn(15, batch, generator=g)
    row, col = torch.randint(0, 12, (n,), generator=g), torch.randint(0, 15, (n,), generator=g)
    want = (a @ b.t())[row, col]
    torch.testing.assert_close(_triton_kernels.sddmm(row.to(torch.int32), col.to(torch.int32), a, b), want,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 5, 130])
def test_sparse_linear_on_the_triton_route_equals_a_masked_linear(batch, bias):
    layer = SparseLinear(50, 40, 0.2, bias=bias, seed=3)
    assert _triton_kernels.usable(layer.values)
    w = layer.to_dense().detach().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_() if bias else None
    x = torch.randn(batch, 50)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x1)
    want = F.linear(x2, w, b)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    keys = layer.active_keys()
    torch.testing.assert_close(layer.values.grad, w.grad.reshape(-1)[keys], rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b.grad)


def test_sampled_grad_on_unsorted_pairs():
    g = torch.Generator().manual_seed(0)
    h_t, delta_t = torch.randn(70, 24, generator=g), torch.randn(50, 24, generator=g)
    flat = torch.randperm(50 * 70, generator=g)[:400]
    r, c = (flat // 70).to(torch.int32), (flat % 70).to(torch.int32)
    torch.testing.assert_close(sampled_grad(50, r, c, h_t, delta_t), (delta_t @ h_t.t()).reshape(-1)[flat],
                               rtol=1e-5, atol=1e-5)


def test_strided_index_views_are_read_as_their_values():
    """A strided view of indices (every 7th pair) gives the same result as its contiguous copy
    (the kernels read raw pointers; found on the H200, where the view was read as contiguous)."""
    g = torch.Generator().manual_seed(2)
    h_t, delta_t = torch.randn(30, 8, generator=g), torch.randn(20, 8, generator=g)
    r_all = torch.randint(0, 20, (70,), generator=g, dtype=torch.int32)
    c_all = torch.randint(0, 30, (70,), generator=g, dtype=torch.int32)
    r, c = r_all[::7], c_all[::7]
    assert not r.is_contiguous()
    want = (delta_t @ h_t.t())[r.long(), c.long()]
    torch.testing.assert_close(_triton_kernels.sddmm(r, c, delta_t, h_t), want, rtol=1e-5, atol=1e-5)
    ptr, rr, cc, values = _random_csr(10, 12, 0.4, 3)
    src = torch.randn(12, 5)
    spread = torch.zeros(2 * cc.numel(), dtype=torch.int32)
    spread[::2] = cc
    dense = torch.zeros(10, 12)
    dense[rr.long(), cc.long()] = values
    torch.testing.assert_close(_triton_kernels.spmm_rows(ptr, spread[::2], values, None, src, None), dense @ src,
                               rtol=1e-5, atol=1e-5)


def test_route_setting(monkeypatch):
    monkeypatch.setenv("REGROW_CUDA_SPARSE", "cusparse")
    with pytest.raises(ValueError, match="REGROW_CUDA_SPARSE"):
        _triton_kernels.route()
    monkeypatch.setenv("REGROW_CUDA_SPARSE", "torch")
    assert _triton_kernels.route() == "torch" and not _triton_kernels.usable(torch.zeros(1))
    monkeypatch.setenv("REGROW_CUDA_SPARSE", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _triton_kernels.usable(torch.zeros(1)), "CPU tensors take the compiled kernels"
    assert not _triton_kernels.usable(torch.zeros(1, dtype=torch.float64))
