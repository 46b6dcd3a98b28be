"""SparseLinear: equal to a masked nn.Linear in value and gradients, on both kernel routes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from regrow.nn import _sparse_kernels, sparse_linear
from regrow.nn.sparse_linear import SparseLinear, _even_counts, constant_fan_in, panel_split
from regrow.nn.sparsify import sparse_mlp, sparsify


def masked_twin(layer: SparseLinear) -> nn.Linear:
    """An nn.Linear whose weight is the layer's weights at the active positions, zero elsewhere."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(layer.to_dense())
        if layer.bias is not None:
            lin.bias.copy_(layer.bias)
    return lin


# batches cover every kernel tile (128, 64, 16 lanes) and the scalar tail
@pytest.mark.parametrize("shape,density,batch", [((37, 23), 0.15, 5), ((64, 200), 0.05, 130), ((20, 9), 1.0, 17),
                                                 ((50, 70), 0.1, 200), ((3, 300), 0.02, 1)])
def test_matches_masked_linear(route, shape, density, batch):
    torch.manual_seed(0)
    in_f, out_f = shape
    layer = SparseLinear(in_f, out_f, density, seed=4)
    lin = masked_twin(layer)
    x = torch.randn(batch, in_f, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), lin(x2)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y2)
    y.backward(g)
    y2.backward(g)
    rows, cols = layer.row_indices.long(), layer.col_indices.long()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.values.grad, lin.weight.grad[rows, cols], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, lin.bias.grad, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 60), cols=st.integers(1, 60), density=st.floats(0.01, 1.0),
       batch=st.integers(1, 150), threads=st.sampled_from([1, 2]), seed=st.integers(0, 99))
def test_fused_backward_equals_separate_passes(rows, cols, density, batch, threads, seed):
    """The one-pass backward (input and weight gradients together) against the two passes it
    replaces, on any shape, batch and thread count."""
    kernels = _sparse_kernels.load()
    if kernels is None:
        pytest.skip(f"compiled kernels unavailable: {_sparse_kernels.unavailable_reason()}")
    layer = SparseLinear(cols, rows, density, seed=seed, bias=False)
    gen = torch.Generator().manual_seed(seed)
    x_t, g_t = torch.randn(cols, batch, generator=gen), torch.randn(rows, batch, generator=gen)
    topo = layer.topology()
    ccol, row_t, perm = topo.csc()
    w = layer.values.detach()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gx, dw = kernels.backward_fused(ccol, row_t, perm, w, g_t, x_t)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(gx, kernels.spmm_rows(ccol, row_t, w, perm, g_t, None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, kernels.sddmm(topo.row, topo.col, g_t, x_t), atol=1e-5, rtol=1e-5)


def panelled_and_single(rows, cols, density, batch, panel_bytes, threads, input_grad_only, seed):
    """(outputs and gradients with one panel, the same with panels of ``panel_bytes``,
    panel counts of the forward and of the input gradient)."""
    if _sparse_kernels.load() is None:
        pytest.skip(f"compiled kernels unavailable: {_sparse_kernels.unavailable_reason()}")
    gen = torch.Generator().manual_seed(seed)
    x0, g = torch.randn(batch, cols, generator=gen), torch.randn(batch, rows, generator=gen)

    def run(panel_bytes: int):
        layer = SparseLinear(cols, rows, density, seed=seed)
        layer.values.requires_grad_(not input_grad_only)
        x = x0.clone().requires_grad_()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sparse_linear, "_PANEL_BYTES", panel_bytes)
            mp.setattr(sparse_linear, "_MIN_PER_PANEL", 1)
            y = layer(x)
            y.backward(g)
            counts = (panel_split(cols, batch, layer.nnz, rows)[0], panel_split(rows, batch, layer.nnz, cols)[0])
        return (y, x.grad, layer.values.grad, layer.bias.grad), counts

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref, _ = run(1 << 40)
        got, counts = run(panel_bytes)
    finally:
        torch.set_num_threads(before)
    return ref, got, counts


def assert_all_equal(ref, got):
    for a, b in zip(ref, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 80), cols=st.integers(1, 80), density=st.floats(0.02, 1.0),
       batch=st.integers(1, 150), panel_bytes=st.integers(4, 4096), threads=st.sampled_from([1, 2]),
       input_grad_only=st.booleans(), seed=st.integers(0, 99))
def test_panels_change_nothing(rows, cols, density, batch, panel_bytes, threads, input_grad_only, seed):
    """Gathering one panel at a time (the large-width route) gives the output and both
    gradients bit for bit, whatever the number of panels: a row's entries keep their order."""
    ref, got, _ = panelled_and_single(rows, cols, density, batch, panel_bytes, threads, input_grad_only, seed)
    assert_all_equal(ref, got)


@pytest.mark.parametrize("batch,input_grad_only", [(128, False), (37, True), (5, False)])
def test_panels_are_used_when_rows_outgrow_a_panel(batch, input_grad_only):
    ref, got, (n_fwd, n_bwd) = panelled_and_single(90, 120, 0.3, batch, 16 * 4 * batch, 2, input_grad_only, 1)
    assert n_fwd == 8 and n_bwd == 6
    assert_all_equal(ref, got)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 99), dtype=st.sampled_from([torch.float32, torch.int32]))
def test_permute_matches_indexing(n, seed, dtype):
    kernels = _sparse_kernels.load()
    if kernels is None:
        pytest.skip(f"compiled kernels unavailable: {_sparse_kernels.unavailable_reason()}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(torch.int32)
    src = torch.randn(n, generator=gen) if dtype == torch.float32 else torch.randint(-2**31, 2**31 - 1, (n,), generator=gen, dtype=torch.int32)
    assert torch.equal(kernels.permute(src, perm), src[perm.long()])
    back = kernels.permute(kernels.permute(src, perm), perm, inverse=True)
    assert torch.equal(back, src)
    with pytest.raises(ValueError):
        kernels.permute(src.double(), perm)


def test_panel_bytes_from_env(monkeypatch):
    monkeypatch.setenv("REGROW_PANEL_BYTES", "1048576")
    assert sparse_linear._panel_bytes_from_env() == 1 << 20
    monkeypatch.setenv("REGROW_PANEL_BYTES", "")
    assert sparse_linear._panel_bytes_from_env() == 8 << 20
    for bad in ("8MB", "0", "-5"):
        monkeypatch.setenv("REGROW_PANEL_BYTES", bad)
        with pytest.raises(ValueError, match="REGROW_PANEL_BYTES"):
            sparse_linear._panel_bytes_from_env()


def test_panel_split():
    assert panel_split(1000, 128, 64_000, 1000) == (1, 1000)            # fits one panel
    n, panel = panel_split(262_144, 128, 64 * 262_144, 262_144)          # 128 MB of rows, 8 MB panels
    assert (n, panel) == (16, 16_384)
    assert panel_split(262_144, 100, 64 * 262_144, 262_144) == (16, 16_384)   # same panels for B in (64, 128]
    n, panel = panel_split(1 << 20, 128, 64 << 20, 1 << 20)             # capped: >= 4 entries per row and panel
    assert n == 16 and n * panel >= 1 << 20 and (n - 1) * panel < 1 << 20
    assert panel_split(1 << 20, 128, 3 << 20, 1 << 20) == (1, 1 << 20)  # too few entries per row for panels


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(_sparse_kernels, "load", lambda: None)   # float64 takes the torch.sparse route anyway
    layer = SparseLinear(6, 5, 0.4, seed=1, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: torch.func.functional_call(
        layer, {"values": v, "bias": b}, (x,)), (x, layer.values, layer.bias))


def test_output_layout_allows_inplace_activation_and_3d_input(route):
    layer = SparseLinear(12, 8, 0.5, seed=2)
    nxt = SparseLinear(8, 3, 0.5, seed=3)
    x = torch.randn(2, 4, 12, requires_grad=True)
    h = nn.ReLU(inplace=True)(layer(x))
    assert h.shape == (2, 4, 8)
    out = nxt(h)
    out.sum().backward()
    ref = masked_twin(nxt)(torch.relu(masked_twin(layer)(x)))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert x.grad is not None and layer.values.grad.shape == layer.values.shape


def test_no_weight_grad_for_frozen_values(route):
    layer = SparseLinear(10, 7, 0.3, bias=False)
    layer.values.requires_grad_(False)
    x = torch.randn(4, 10, requires_grad=True)
    layer(x).sum().backward()
    assert layer.values.grad is None and x.grad is not None


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 60), frac=st.floats(0.01, 1.0), seed=st.integers(0, 99))
def test_constant_fan_in_rows_are_distinct_uniform_subsets(rows, cols, frac, seed):
    nnz = max(1, round(frac * rows * cols))
    gen = torch.Generator().manual_seed(seed)
    counts = _even_counts(rows, nnz, gen)
    row, col = constant_fan_in(rows, cols, counts, gen)
    assert row.numel() == nnz
    assert torch.equal(torch.bincount(row, minlength=rows), counts)
    assert int(counts.max() - counts.min()) <= 1
    key = row * cols + col
    assert bool((key[1:] > key[:-1]).all()), "keys must be strictly increasing (sorted, distinct)"
    assert int(col.min()) >= 0 and int(col.max()) < cols


def test_constructor_density_fan_in_and_seed():
    a = SparseLinear(1000, 300, fan_in=16, seed=7)
    assert a.nnz == 300 * 16
    assert torch.equal(torch.bincount(a.row_indices.long()), torch.full((300,), 16))
    b = SparseLinear(1000, 300, fan_in=16, seed=7)
    assert torch.equal(a.col_indices, b.col_indices) and torch.equal(a.values, b.values)
    c = SparseLinear(1000, 300, fan_in=16, seed=8)
    assert not torch.equal(a.col_indices, c.col_indices)
    d = SparseLinear(50, 40, density=0.1)
    assert d.nnz == 200 and d.row_indices.dtype == torch.int32
    # values follow the actual fan-in: U(-1/sqrt(16), 1/sqrt(16)), not the dense 1/sqrt(1000)
    assert 0.2 < float(a.values.detach().abs().max()) <= 0.25


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of"), ({"density": 0.1, "fan_in": 3}, "exactly one of"),
    ({"density": 0.0}, "density"), ({"density": 1.5}, "density"), ({"fan_in": 0}, "fan_in"),
    ({"fan_in": 11}, "fan_in"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseLinear(10, 4, **kwargs)


def test_wrong_input_width():
    with pytest.raises(ValueError, match="expects inputs with 10 features"):
        SparseLinear(10, 4, 0.5)(torch.randn(3, 9))


def test_from_dense_round_trip_and_resizing_state_dict():
    w = torch.randn(6, 9) * (torch.rand(6, 9) < 0.3)
    layer = SparseLinear.from_dense(w, bias=torch.randn(6))
    assert torch.equal(layer.to_dense(), w) and layer.nnz == int((w != 0).sum())
    other = SparseLinear(9, 6, 0.9, seed=1)
    other.load_state_dict(layer.state_dict())
    assert other.nnz == layer.nnz and torch.equal(other.to_dense(), w)
    x = torch.randn(4, 9)
    torch.testing.assert_close(other(x), layer(x))


def test_sparsify_converts_linear_layers_with_allocated_counts():
    from regrow.core.density import allocate_counts
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(inplace=True), nn.Linear(128, 10))
    sparsify(model, sparsity=0.9, distribution="erk", seed=3)
    layers = [m for m in model if isinstance(m, SparseLinear)]
    assert len(layers) == 2 and not any(isinstance(m, nn.Linear) for m in model)
    want = allocate_counts({"1": (128, 64), "3": (10, 128)}, 0.1, "erk")
    assert [m.nnz for m in layers] == [want["1"], want["3"]]
    out = model(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 10)


def test_sparsify_fan_in_dense_layers_and_errors():
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5))
    sparsify(model, fan_in=8, dense_layers=["2"])
    assert isinstance(model[0], SparseLinear) and model[0].nnz == 20 * 8
    assert type(model[2]) is nn.Linear
    with pytest.raises(ValueError, match="exactly one"):
        sparsify(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="unknown module"):
        sparsify(nn.Sequential(nn.Linear(3, 3)), sparsity=0.5, dense_layers=["nope"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        sparsify(nn.Sequential(nn.ReLU()), sparsity=0.5)


def test_sparse_mlp_is_linear_in_width():
    small = sparse_mlp(784, [1000, 1000], 10, fan_in=32)
    big = sparse_mlp(784, [4000, 4000], 10, fan_in=32)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 3.9 < n(big) / n(small) < 4.1
    assert big(torch.randn(2, 784)).shape == (2, 10)
