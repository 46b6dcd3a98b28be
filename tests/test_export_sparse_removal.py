"""The condensed export removes the ablated neurons of always-sparse layers (SparseLinear) on
their indices: the same layers as the dense route (SparseLinear -> nn.Linear + mask, then the
masked export), the model's outputs, and no tensor of size out x in."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from regrow.export import export
from regrow.nn import CondensedLinear, CSRLinear, SparseLinear
from helpers import LargestTensor, srigl_trained_sparse_mlp

DIRECT = "read from the layer's indices (no dense weight)"


def _sparse(in_f: int, out_f: int, fan_in: int, dead=(), seed: int = 0, bias: bool = True) -> SparseLinear:
    """A SparseLinear with constant fan-in whose rows ``dead`` hold no entry (ablated neurons)."""
    layer = SparseLinear(in_f, out_f, fan_in=fan_in, seed=seed, bias=bias)
    keep = torch.ones(out_f, dtype=torch.bool)
    keep[list(dead)] = False
    live = keep[layer.row_indices.long()]
    layer._assign(layer.row_indices[live], layer.col_indices[live], layer.values.detach()[live])
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.randn(out_f, generator=torch.Generator().manual_seed(seed + 100)))
    return layer


def _dense_twin(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``model`` with each SparseLinear as nn.Linear + mask: the export's old dense route."""
    twin, masks = copy.deepcopy(model), {}
    for name, m in list(twin.named_modules()):
        if isinstance(m, SparseLinear):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(m.to_dense())
                if m.bias is not None:
                    dense.bias.copy_(m.bias)
            mask = torch.zeros(m.out_features * m.in_features, dtype=torch.bool)
            mask[m.active_keys()] = True
            masks[f"{name}.weight"] = mask.view(m.out_features, m.in_features)
            twin.set_submodule(name, dense)
    return twin, masks


def _assert_same_as_dense_route(model: nn.Module, x: torch.Tensor, masks=None, **options) -> nn.Module:
    """Export ``model`` (condensed) and check it against the dense route: same layer types and
    tensors (bias to rounding: the folded sums run in another order), same report apart from
    the note on reading indices, and the model's outputs. Returns the export."""
    with torch.no_grad():   # the masked dense layers as trained: zeros where masked
        for name, mask in (masks or {}).items():
            model.get_parameter(name).mul_(mask)
    twin, twin_masks = _dense_twin(model)
    out = export(model, masks or {}, "condensed", **options)
    ref = export(twin, {**twin_masks, **(masks or {})}, "condensed", **options)
    got_mods, ref_mods = dict(out.named_modules()), dict(ref.named_modules())
    assert list(got_mods) == list(ref_mods)
    for name, m in ref_mods.items():
        g = got_mods[name]
        assert type(g) is type(m), name
        for attr in ("weight", "indices", "row_index", "values", "crow_indices", "col_indices"):
            if isinstance(getattr(m, attr, None), torch.Tensor):
                assert torch.equal(getattr(g, attr), getattr(m, attr)), (name, attr)
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            torch.testing.assert_close(g.bias, m.bias, atol=1e-6, rtol=1e-6)
    for g, r in zip(out.regrow_export_report, ref.regrow_export_report):
        assert {k: v for k, v in g.items() if k not in ("kind", "notes")} == \
               {k: v for k, v in r.items() if k not in ("kind", "notes")}
        if isinstance(model.get_submodule("" if g["name"] == "(root)" else g["name"]), SparseLinear):
            assert set(r["notes"].split("; ")) - {""} <= set(g["notes"].split("; "))
            assert "from the layer's indices" in g["notes"]
    with torch.no_grad():
        torch.testing.assert_close(out(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    return out


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid])   # sigmoid: every dead neuron outputs a constant != 0
def test_sparse_mlp_with_ablated_rows(act):
    model = nn.Sequential(_sparse(12, 16, 4, dead=(1, 5, 7), seed=1), act(),
                          _sparse(16, 10, 5, dead=(0, 3), seed=2), act(),
                          _sparse(10, 4, 3, seed=3))
    out = _assert_same_as_dense_route(model, torch.randn(9, 12))
    assert [type(out[i]) for i in (0, 2, 4)] == [CondensedLinear] * 3
    assert (out[0].out_features, out[2].in_features, out[2].out_features, out[4].in_features) == (13, 13, 8, 8)
    notes = {r["name"]: r["notes"] for r in out.regrow_export_report}
    assert "removed 3 ablated neurons and the matching inputs of '2'" in notes["0"]
    assert "3 inputs removed (ablated in '0')" in notes["2"] and "padding slots" in notes["2"]
    assert "removed 2 ablated neurons and the matching inputs of '4'" in notes["2"]
    assert all(DIRECT in n for n in notes.values())


def test_dead_neuron_constant_folds_into_the_next_bias():
    # layer 1's neuron 1 has no inputs and bias 0.7: it outputs relu(0.7) whatever the input
    w1 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    w2 = torch.tensor([[0.5, 3.0, 0.0], [0.0, -2.0, 1.5]])
    b1, b2 = torch.tensor([0.1, 0.7, -0.2]), torch.tensor([0.25, -0.5])
    model = nn.Sequential(SparseLinear.from_dense(w1, b1), nn.ReLU(), SparseLinear.from_dense(w2, b2))
    out = export(model, {}, "condensed")
    assert out[0].out_features == 2 and out[2].in_features == 2
    expected_b2 = b2 + torch.relu(b1[1]) * w2[:, 1]   # the removed input's constant times its weights
    torch.testing.assert_close(out[2].bias, expected_b2)
    x = torch.randn(5, 3)
    reference = torch.relu(x @ w1.t() + b1) @ w2.t() + b2   # independent dense computation
    with torch.no_grad():
        torch.testing.assert_close(out(x), reference)
    # no bias on the consumer: the fold creates one
    model = nn.Sequential(SparseLinear.from_dense(w1, b1), nn.ReLU(), SparseLinear.from_dense(w2, None))
    out = export(model, {}, "condensed")
    torch.testing.assert_close(out[2].bias, torch.relu(b1[1]) * w2[:, 1])


def test_mixed_chains_with_masked_layers():
    torch.manual_seed(0)
    # SparseLinear -> ReLU -> masked nn.Linear (a dense last layer)
    head = nn.Linear(16, 3)
    head_mask = torch.rand(16 * 3).view(3, 16) < 0.5
    model = nn.Sequential(_sparse(8, 16, 3, dead=(2, 9), seed=4), nn.ReLU(), head)
    out = _assert_same_as_dense_route(model, torch.randn(6, 8), {"2.weight": head_mask})
    assert out[0].out_features == 14 and out[2].in_features == 14
    # masked nn.Linear with dead rows -> batch norm -> ReLU -> SparseLinear
    first = nn.Linear(8, 12)
    mask = torch.rand(12, 8) < 0.6
    mask[[0, 4, 11]] = False
    bn = nn.BatchNorm1d(12).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(first, bn, nn.ReLU(), _sparse(12, 5, 4, seed=5))
    out = _assert_same_as_dense_route(model, torch.randn(6, 8), {"0.weight": mask})
    assert out[3].in_features == 9 and out[1].num_features == 9
    # conv (masked, dead channels) -> ReLU -> flatten -> SparseLinear: 16 inputs per channel
    conv = nn.Conv2d(1, 4, 3)
    cmask = torch.ones_like(conv.weight, dtype=torch.bool)
    cmask[[1, 2]] = False
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), _sparse(64, 5, 20, seed=6))
    out = _assert_same_as_dense_route(model, torch.randn(3, 1, 6, 6), {"0.weight": cmask})
    assert out[0].out_channels == 2 and out[3].in_features == 32
    notes = {r["name"]: r["notes"] for r in out.regrow_export_report}
    assert "32 inputs removed (ablated in '0')" in notes["3"]


def test_varying_fan_in_consumer_becomes_csr_or_dense():
    torch.manual_seed(1)
    consumer = SparseLinear.from_dense(torch.randn(6, 10) * (torch.rand(6, 10) < 0.5))
    model = nn.Sequential(_sparse(5, 10, 2, dead=(3, 4), seed=7), nn.Tanh(), consumer)
    out = _assert_same_as_dense_route(model, torch.randn(4, 5))
    assert type(out[2]) is nn.Linear   # varying fan-in above csr_max_density: dense, as masked
    assert out[2].in_features == 8
    out = _assert_same_as_dense_route(model, torch.randn(4, 5), csr_max_density=0.6)
    assert type(out[2]) is CSRLinear and out[2].in_features == 8


def test_srigl_trained_sparse_mlp_matches_dense_route():
    model, dst = srigl_trained_sparse_mlp()
    dead = {i: int((model[i].row_indices.bincount(minlength=model[i].rows) == 0).sum()) for i in (1, 3)}
    assert sum(dead.values()), "the test needs SRigL to have ablated neurons"
    out = _assert_same_as_dense_route(model, torch.randn(9, 20))
    assert out[1].out_features == 32 - dead[1] and out[3].out_features == 24 - dead[3]
    assert out[3].in_features == 32 - dead[1] and out[5].in_features == 24 - dead[3]


def test_no_out_by_in_tensor_while_removing_neurons():
    # 3000 -> 2000 -> 3000 -> 10 at fan-in 4: out x in is 6,000,000 per hidden layer, N 8,000-12,000
    model = nn.Sequential(_sparse(3000, 2000, 4, dead=range(0, 2000, 7), seed=8), nn.ReLU(),
                          _sparse(2000, 3000, 4, dead=range(0, 3000, 11), seed=9), nn.ReLU(),
                          _sparse(3000, 10, 4, seed=10))
    sizes = LargestTensor()
    with sizes:
        out = export(model, {}, "condensed")
    assert (out[0].out_features, out[2].in_features) == (2000 - 286, 2000 - 286)
    assert (out[2].out_features, out[4].in_features) == (3000 - 273, 3000 - 273)
    assert [type(out[i]) for i in (0, 2, 4)] == [CondensedLinear] * 3
    # the largest tensors are O(N + out + in) (measured: 87 kB, the int64 row indices of the
    # 10,908 entries of layer 2); a dense weight would be 6e6 floats (24 MB)
    bound = 8 * (max(model[i].nnz for i in (0, 2, 4)) + 3000)   # 8 bytes per entry or feature
    assert sizes.nbytes <= bound < 2000 * 3000 * 4 // 100, f"export built a tensor of {sizes.nbytes} bytes"
    x = torch.randn(4, 3000)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 9), min_size=3, max_size=4), data=st.data(),
       act=st.sampled_from([nn.ReLU, nn.Sigmoid, nn.Tanh]), bias=st.booleans(), seed=st.integers(0, 999))
def test_random_sparse_mlps_match_the_dense_route(widths, data, act, bias, seed):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        fan_in = data.draw(st.integers(1, n_in))
        dead = data.draw(st.sets(st.integers(0, n_out - 1), max_size=n_out))
        layers += [_sparse(n_in, n_out, fan_in, dead=sorted(dead), seed=seed + i, bias=bias), act()]
    model = nn.Sequential(*layers[:-1])
    _assert_same_as_dense_route(model, torch.randn(3, widths[0], generator=torch.Generator().manual_seed(seed)))


@settings(max_examples=30, deadline=None)
@given(out_f=st.integers(1, 9), in_f=st.integers(1, 9), density=st.floats(0.0, 1.0), seed=st.integers(0, 999))
def test_padded_from_indices_equals_from_dense(out_f, in_f, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=gen) < density   # varying fan-in, empty rows
    w = torch.randn(out_f, in_f, generator=gen) * mask
    row, col = mask.nonzero(as_tuple=True)
    ref = CondensedLinear.from_dense(w, mask, torch.ones(out_f))
    got = CondensedLinear.from_indices(row, col, w[row, col], (out_f, in_f), torch.ones(out_f), pad=True)
    assert got.fan_in == ref.fan_in and got.rows == ref.rows
    assert torch.equal(got.weight, ref.weight) and torch.equal(got.indices, ref.indices)
    assert (got.row_index is None) == (ref.row_index is None)
    assert got.row_index is None or torch.equal(got.row_index, ref.row_index)
