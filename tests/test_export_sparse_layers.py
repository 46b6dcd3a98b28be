"""The export reads always-sparse linear layers (SparseLinear) from their indices: no dense detour."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from regrow.export import export
from regrow.nn import CondensedLinear, CSRLinear, SparseLinear, sparse_mlp, sparsify
from helpers import LargestTensor, srigl_trained_sparse_mlp

DIRECT = "read from the layer's indices"


def _entries(mask: torch.Tensor, seed: int):
    """Row-major (row, col) of ``mask``, random values, and the same entries shuffled."""
    gen = torch.Generator().manual_seed(seed)
    row, col = mask.nonzero(as_tuple=True)
    values = torch.randn(row.numel(), generator=gen)
    perm = torch.randperm(row.numel(), generator=gen)
    return (row, col, values), (row[perm], col[perm], values[perm])


def _weight(mask, row, col, values):
    w = torch.zeros(mask.shape)
    w[row, col] = values
    return w


@settings(max_examples=40, deadline=None)
@given(out_f=st.integers(1, 9), in_f=st.integers(1, 9), k=st.integers(1, 9), empty=st.integers(0, 9),
       bias=st.booleans(), seed=st.integers(0, 999))
def test_condensed_from_indices_equals_from_dense(out_f, in_f, k, empty, bias, seed):
    k = min(k, in_f)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    for r in range(out_f):
        mask[r, torch.randperm(in_f, generator=gen)[:k]] = True
    mask[torch.randperm(out_f, generator=gen)[:min(empty, out_f - 1)]] = False  # ablated rows
    b = torch.randn(out_f, generator=gen) if bias else None
    ordered, shuffled = _entries(mask, seed)
    ref = CondensedLinear.from_dense(_weight(mask, *ordered), mask, b)
    for entries in (ordered, shuffled):
        got = CondensedLinear.from_indices(*entries, (out_f, in_f), b)
        assert got.fan_in == ref.fan_in and got.rows == ref.rows
        assert torch.equal(got.weight, ref.weight) and torch.equal(got.indices, ref.indices)
        assert (got.row_index is None) == (ref.row_index is None)
        if ref.row_index is not None:
            assert torch.equal(got.row_index, ref.row_index)
        assert (b is None and got.bias is None) or torch.equal(got.bias, ref.bias)


@settings(max_examples=40, deadline=None)
@given(out_f=st.integers(1, 9), in_f=st.integers(1, 9), density=st.floats(0.0, 1.0), seed=st.integers(0, 999))
def test_csr_from_indices_equals_from_dense(out_f, in_f, density, seed):
    mask = torch.rand(out_f, in_f, generator=torch.Generator().manual_seed(seed)) < density
    ordered, shuffled = _entries(mask, seed)
    ref = CSRLinear.from_dense(_weight(mask, *ordered), mask, torch.ones(out_f))
    for entries in (ordered, shuffled):
        got = CSRLinear.from_indices(*entries, (out_f, in_f), torch.ones(out_f))
        for attr in ("values", "crow_indices", "col_indices", "bias"):
            assert torch.equal(getattr(got, attr), getattr(ref, attr)), attr


def test_from_indices_refuses_bad_entries():
    row, col, vals = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), torch.ones(3)
    with pytest.raises(ValueError, match="same number of entries"):
        CondensedLinear.from_indices(row, col, vals, (2, 2))
    with pytest.raises(ValueError, match="repeated"):
        CSRLinear.from_indices(torch.tensor([0, 0]), torch.tensor([1, 1]), torch.ones(2), (2, 2))
    with pytest.raises(ValueError, match="out of range"):
        CSRLinear.from_indices(torch.tensor([2]), torch.tensor([0]), torch.ones(1), (2, 2))


def _assert_same(exported, model, x):
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_constant_fan_in_mlp_exports_directly():
    model = sparse_mlp(20, [32, 24], 5, fan_in=4, seed=3)
    x = torch.randn(7, 20)
    for fmt, cls in (("condensed", CondensedLinear), ("csr", CSRLinear)):
        out = export(model, {}, fmt)
        assert [type(out[i]) for i in (1, 3, 5)] == [cls] * 3
        assert all(DIRECT in r["notes"] for r in out.regrow_export_report)
        assert [r["name"] for r in out.regrow_export_report] == ["1", "3", "5"]
        _assert_same(out, model, x)


def test_varying_fan_in_exports_csr_or_dense():
    model = sparsify(nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 6)), sparsity=0.95,
                     distribution="uniform", seed=2)
    counts = model[0].row_indices.bincount(minlength=40)
    assert counts.min() != counts.max(), "the test needs varying fan-in"
    x = torch.randn(5, 30)
    out = export(model, {}, "condensed", csr_max_density=0.1)
    assert type(out[0]) is CSRLinear and DIRECT in out.regrow_export_report[0]["notes"]
    _assert_same(out, model, x)
    out = export(model, {}, "condensed", csr_max_density=0.01)   # above it: stays dense
    assert type(out[0]) is nn.Linear
    _assert_same(out, model, x)
    out = export(model, {}, "csr")
    assert type(out[0]) is CSRLinear and type(out[2]) is CSRLinear
    _assert_same(out, model, x)


def test_srigl_trained_mlp_with_ablated_rows():
    model, dst = srigl_trained_sparse_mlp()
    ablated = [i for i in (1, 3) if bool((model[i].row_indices.bincount(minlength=model[i].rows) == 0).any())]
    assert ablated, "the test needs SRigL to have ablated neurons"
    xt = torch.randn(9, 20)
    for fmt in ("condensed", "csr"):
        out = export(model, dst, fmt)
        _assert_same(out, model, xt)
    # csr: no removal across layers, so every layer (ablated rows included) is read from indices
    assert all(DIRECT in r["notes"] for r in out.regrow_export_report)


@pytest.mark.parametrize("fmt, cls", [("condensed", CondensedLinear), ("csr", CSRLinear)])
def test_no_out_by_in_tensor_for_a_large_layer(fmt, cls):
    # 50,000 x 50,000 at fan-in 4: a dense weight would be 2.5e9 floats (10 GB); N is 200,000
    layer = SparseLinear(50_000, 50_000, fan_in=4, seed=0)
    sizes = LargestTensor()
    with sizes:
        out = export(layer, {}, fmt)
    assert type(out) is cls
    # the largest is an int64 array of N keys (1.6 MB); 10 MB is far below a 10 GB dense weight
    assert sizes.nbytes <= 8 * layer.nnz, f"export built a tensor of {sizes.nbytes} bytes"
    x = torch.randn(2, 50_000)
    with torch.no_grad():
        torch.testing.assert_close(out(x), layer(x), atol=1e-5, rtol=1e-5)


def test_condensed_mixes_direct_layers_and_neuron_removal():
    model = sparse_mlp(20, [32, 24], 3, fan_in=6, seed=4)
    hidden = model[3]   # ablate 5 of its 24 neurons: its entries in those rows go
    keep = hidden.row_indices >= 5
    hidden._assign(hidden.row_indices[keep], hidden.col_indices[keep], hidden.values.detach()[keep])
    out = export(model, {}, "condensed")
    report = {r["name"]: r for r in out.regrow_export_report}
    assert DIRECT in report["1"]["notes"]              # input 20: no ablating layer can feed it
    assert "removed 5 ablated neurons" in report["3"]["notes"]
    assert out[3].out_features == 19 and out[5].in_features == 19
    _assert_same(out, model, torch.randn(6, 20))
