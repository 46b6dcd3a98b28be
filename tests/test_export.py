"""Exported models give the masked model's outputs; save/load round-trips; bad files are refused."""
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import regrow
import regrow.train as train_mod
from regrow import models
from regrow.experiments.config import TrainConfig
from regrow.experiments.export_run import export_run
from regrow.export import export, format_report, load_exported, save_exported
from regrow.nn import CondensedLinear, CSRLinear, sparse_linear

TOL = dict(rtol=1e-5, atol=1e-5)


def constant_fan_in_masks(model, density=0.3, dead_fraction=0.25, seed=0, skip=()):
    """SRigL-like masks for every weight of dim >= 2: constant fan-in, some all-False rows."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() < 2 or name in skip:
            continue
        out, fan = p.shape[0], p[0].numel()
        k = max(1, int(fan * density))
        mask = torch.zeros(out, fan, dtype=torch.bool)
        dead = torch.rand(out, generator=g) < dead_fraction
        dead[0] = False  # at least one live neuron per layer
        for r in range(out):
            if not dead[r]:
                mask[r, torch.randperm(fan, generator=g)[:k]] = True
        masks[name] = mask.view_as(p)
    return masks


def randomize(model, seed=0):
    """Nonzero biases and batch-norm statistics, so ablated neurons output nonzero constants."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.num_features, generator=g))
    return model


def masked_reference(model, masks):
    ref = export(model, masks, "dense")
    assert all(type(a) is type(b) for a, b in zip(ref.modules(), model.modules()))
    return ref


def assert_same_outputs(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), **TOL)
        torch.testing.assert_close(a(x[:1]), b(x[:1]), **TOL)


def mlp(widths=(64, 48, 32, 10), act=nn.ReLU):
    layers = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers += [act(), nn.Dropout(0.2)]
    return randomize(nn.Sequential(*layers))


# -- MLPs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.GELU])
def test_condensed_mlp_matches_masked_model_and_shrinks(act):
    model = mlp(act=act)
    masks = constant_fan_in_masks(model)
    ref = masked_reference(model, masks)
    out = export(model, masks, "condensed")
    assert not out.training
    x = torch.randn(9, 64)
    assert_same_outputs(out, ref, x)
    linears = [m for m in out.modules() if isinstance(m, CondensedLinear)]
    assert len(linears) == 3
    live = [int(masks[f"{i}.weight"].any(1).sum()) for i in (1, 4, 7)]
    # hidden layers lose their ablated neurons, and the next layer the matching inputs
    assert [m.out_features for m in linears[:2]] == live[:2]
    assert [m.in_features for m in linears[1:]] == live[:2]
    report = {r["name"]: r for r in out.regrow_export_report}
    assert report["1"]["format"] == "condensed" and "removed" in report["1"]["notes"]
    assert report["4"]["nnz"] == int(masks["4.weight"][:, masks["1.weight"].any(1)].sum())
    assert "1" in format_report(out.regrow_export_report)


def test_ablated_neuron_bias_is_folded_into_the_next_layer():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.5, 2.0, -1.0]))
        model[2].weight.fill_(1.0)
        model[2].bias.zero_()
    masks = {"0.weight": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool),
             "2.weight": torch.ones(2, 3, dtype=torch.bool)}
    out = export(model, masks, "condensed")
    # neurons 1 and 2 are gone; neuron 1 still emitted relu(2.0) = 2 into every output
    assert out[0].out_features == 1 and out[2].in_features == 1
    torch.testing.assert_close(out[2].bias, torch.tensor([2.0, 2.0]))
    x = torch.randn(5, 4)
    assert_same_outputs(out, masked_reference(model, masks), x)


def test_batchnorm_between_linears_is_sliced():
    model = randomize(nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 5)))
    masks = constant_fan_in_masks(model, dead_fraction=0.4)
    out = export(model, masks, "condensed")
    live = int(masks["0.weight"].any(1).sum())
    assert out[1].num_features == live and out[1].running_mean.shape == (live,)
    assert_same_outputs(out, masked_reference(model, masks), torch.randn(6, 20))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(x + self.fc2(F.relu(self.fc1(x))))


class Branchy(Residual):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 1.0
        return self.head(self.fc2(F.relu(self.fc1(x))))


def test_unprovable_removals_keep_the_width():
    model = randomize(Residual())
    masks = constant_fan_in_masks(model, dead_fraction=0.4, seed=2)
    out = export(model, masks, "condensed")
    assert_same_outputs(out, masked_reference(model, masks), torch.randn(4, 12))
    report = {r["name"]: r for r in out.regrow_export_report}
    assert out.fc1.out_features < 12 and out.fc2.in_features == out.fc1.out_features  # a proven chain
    assert out.fc2.out_features == 12 and "residual" in report["fc2"]["notes"]  # feeds x + ...

    model = randomize(Branchy())
    out = export(model, masks, "condensed")
    assert out.fc1.out_features == 12 and "torch.fx" in {r["name"]: r for r in out.regrow_export_report}["fc1"]["notes"]
    for x in (torch.randn(4, 12).abs(), -torch.randn(4, 12).abs()):
        assert_same_outputs(out, masked_reference(model, masks), x)


def test_non_constant_fan_in_falls_back():
    model = randomize(nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 4)))
    g = torch.Generator().manual_seed(1)
    masks = {"0.weight": torch.rand(40, 50, generator=g) < 0.05,     # unstructured, sparse: csr
             "2.weight": torch.rand(30, 40, generator=g) < 0.5,      # unstructured, dense-ish: dense
             "4.weight": constant_fan_in_masks(model)["4.weight"]}
    out = export(model, masks, "condensed")
    assert isinstance(out[0], CSRLinear) and type(out[2]) is nn.Linear and isinstance(out[4], CondensedLinear)
    notes = {r["name"]: r["notes"] for r in out.regrow_export_report}
    assert "csr" in notes["0"] and "dense" in notes["2"]
    assert_same_outputs(out, masked_reference(model, masks), torch.randn(5, 50))


def test_density_exactly_at_the_csr_threshold_is_csr():
    model = randomize(nn.Sequential(nn.Linear(50, 40)))
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(40 * 50, dtype=torch.bool)
    mask[torch.randperm(40 * 50, generator=g)[:200]] = True     # 200 / 2000: exactly 0.1
    mask = mask.view(40, 50)
    assert int(mask.sum()) == 200 and not regrow.nn.condensed.has_constant_fan_in(mask)
    assert float(mask.float().mean()) > 0.1          # the float32 mean that used to decide
    out = export(model, {"0.weight": mask}, "condensed", csr_max_density=0.1)
    assert isinstance(out[0], CSRLinear)
    assert "csr (density 0.100 <= 0.1)" in out.regrow_export_report[0]["notes"]
    assert_same_outputs(out, masked_reference(model, {"0.weight": mask}), torch.randn(4, 50))


def test_layers_without_zeros_stay_dense_in_condensed_export():
    model = mlp()
    masks = constant_fan_in_masks(model)
    masks["4.weight"] = torch.ones_like(masks["4.weight"])       # a dense layer (e.g. a dense run)
    out = export(model, masks, "condensed")
    assert type(out[4]) is nn.Linear and isinstance(out[1], CondensedLinear)
    assert isinstance(out[7], CondensedLinear)
    row = next(r for r in out.regrow_export_report if r["name"] == "4")
    assert row["format"] == "dense" and "no zeros (density 1): dense" in row["notes"]
    assert_same_outputs(out, masked_reference(model, masks), torch.randn(5, 64))
    # a dense run: every layer stays nn.Linear
    ones = {k: torch.ones_like(v) for k, v in masks.items()}
    out = export(model, ones, "condensed")
    assert all(type(out[i]) is nn.Linear for i in (1, 4, 7))
    assert_same_outputs(out, masked_reference(model, ones), torch.randn(5, 64))


@pytest.mark.parametrize("fmt,cls", [("csr", CSRLinear), ("dense", nn.Linear)])
def test_csr_and_dense_formats(fmt, cls):
    model = mlp()
    masks = constant_fan_in_masks(model)
    out = export(model, masks, fmt)
    assert all(type(out[i]) is cls for i in (1, 4, 7))
    assert out[1].out_features == 48  # no removal outside condensed
    assert_same_outputs(out, masked_reference(model, masks), torch.randn(7, 64))


def test_export_leaves_the_model_alone_and_checks_its_input():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = constant_fan_in_masks(model)
    export(model, masks, "condensed")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    with pytest.raises(ValueError, match="unknown export format"):
        export(model, masks, "coo")
    with pytest.raises(ValueError, match="names no parameter"):
        export(model, {"nope.weight": masks["1.weight"]})
    with pytest.raises(ValueError, match="has shape"):
        export(model, {"1.weight": masks["1.weight"][:, :3]})


@given(widths=st.lists(st.integers(2, 24), min_size=2, max_size=4), density=st.floats(0.05, 1.0),
       dead=st.floats(0.0, 0.6), seed=st.integers(0, 1000))
def test_condensed_export_property(widths, density, dead, seed):
    torch.manual_seed(seed)
    model = mlp(tuple(widths))
    masks = constant_fan_in_masks(model, density, dead, seed)
    out = export(model, masks, "condensed")
    assert_same_outputs(out, masked_reference(model, masks), torch.randn(5, widths[0]))


# -- convolutional models (regrow.models) -----------------------------------------------------------
def zoo(name, in_shape, **options):
    torch.manual_seed(0)
    model = randomize(models.build(name, 10, in_shape, **options))
    # build() records how to rebuild the model, so save_exported needs no arch= argument
    assert model.regrow_arch == {"name": name, "num_classes": 10, "in_shape": list(in_shape), "options": options}
    return model


@pytest.mark.parametrize("name,in_shape,options", [
    ("lenet5", (1, 28, 28), {}),
    ("resnet20", (3, 8, 8), {"width": 0.5}),
    ("resnet18", (3, 8, 8), {"width": 0.125}),  # option-B shortcuts: 1x1 conv + batch norm
])
def test_cnn_exports_match_and_round_trip(name, in_shape, options, tmp_path):
    model = zoo(name, in_shape, **options)
    masks = constant_fan_in_masks(model, density=0.3, dead_fraction=0.3)
    ref = masked_reference(model, masks)
    x = torch.randn(3, *in_shape)
    for fmt in ("condensed", "csr"):
        out = export(model, masks, fmt)
        assert_same_outputs(out, ref, x)
        loaded = load_exported(save_exported(out, tmp_path / f"{name}-{fmt}")["weights"])
        assert_same_outputs(loaded, out, x)
        assert loaded.regrow_export_report == out.regrow_export_report
    report = {r["name"]: r for r in out.regrow_export_report if r["kind"] == "Conv2d"}
    assert all("conv: dense" in r["notes"] for r in report.values())


def test_lenet_conv_channels_removed_through_pool_and_flatten():
    model = zoo("lenet5", (1, 28, 28))
    masks = constant_fan_in_masks(model, dead_fraction=0.3)
    out = export(model, masks, "condensed")
    live = int(masks["features.3.weight"].flatten(1).any(1).sum())
    assert out.features[3].out_channels == live
    assert out.classifier[1].in_features == live * 25  # 16 x 5 x 5 flattened, per channel
    assert_same_outputs(out, masked_reference(model, masks), torch.randn(2, 1, 28, 28))


def test_resnet_removes_inner_block_channels_only():
    model = zoo("resnet20", (3, 8, 8), width=0.5)
    masks = constant_fan_in_masks(model, dead_fraction=0.3, seed=4)
    with torch.no_grad():  # make the ablated channels' constant zero, so they can be removed
        for block in model.stages.modules():
            if hasattr(block, "bn1"):
                block.bn1.bias.fill_(-5.0)
    out = export(model, masks, "condensed")
    block = out.stages[0][0]
    live = int(masks["stages.0.0.conv1.weight"].flatten(1).any(1).sum())
    assert block.conv1.out_channels == live == block.bn1.num_features == block.conv2.in_channels
    assert block.conv2.out_channels == model.stages[0][0].conv2.out_channels  # feeds the residual sum
    assert_same_outputs(out, masked_reference(model, masks), torch.randn(2, 3, 8, 8))


# -- training through the engine ----------------------------------------------------------------
def test_srigl_training_then_export():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = regrow.DynamicSparsity(model, opt, method="srigl", sparsity=0.9, total_steps=120,
                                 update_interval=10, distribution="uniform")
    x = torch.randn(128, 20)
    y = x[:, :4].argmax(1)
    for _ in range(120):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        dst.step()
    out = export(model, dst, "condensed")
    model.eval()
    assert_same_outputs(out, model, x)
    formats = {r["name"]: r["format"] for r in out.regrow_export_report}
    assert formats == {"0": "condensed", "2": "condensed", "4": "condensed"}
    layers = dst.stats()["layers"]
    assert out[0].out_features == layers["0.weight"]["active_neurons"]


# -- save / load --------------------------------------------------------------------------------
def test_sequential_round_trip_without_arch(tmp_path):
    model = mlp()
    out = export(model, constant_fan_in_masks(model), "condensed")
    info = save_exported(out, tmp_path / "mlp.safetensors")
    assert info["weights"].name == "mlp.safetensors" and info["spec"].name == "mlp.json"
    spec = json.loads(info["spec"].read_text())
    assert spec["arch"]["kind"] == "tree"
    loaded = load_exported(tmp_path / "mlp")
    assert [type(m) for m in loaded] == [type(m) for m in out]
    assert_same_outputs(loaded, out, torch.randn(4, 64))


def test_models_round_trip_rebuilds_the_architecture(tmp_path):
    model = zoo("mlp", (1, 8, 8), widths=[32, 16])
    out = export(model, constant_fan_in_masks(model), "condensed")
    info = save_exported(out, tmp_path / "m")
    spec = json.loads(info["spec"].read_text())
    assert spec["arch"]["name"] == "mlp" and set(spec["replaced"]) == {"net.fc1", "net.fc2", "net.fc3"}
    loaded = load_exported(info["spec"])
    assert type(loaded) is type(model) and loaded.regrow_arch["options"] == {"widths": [32, 16]}
    assert_same_outputs(loaded, out, torch.randn(3, 1, 8, 8))


def test_save_refuses_unknown_modules_without_arch(tmp_path):
    model = randomize(Residual())
    with pytest.raises(ValueError, match="arch="):
        save_exported(export(model, {}, "dense"), tmp_path / "r")


@pytest.fixture
def saved(tmp_path):
    model = mlp()
    out = export(model, constant_fan_in_masks(model), "condensed")
    info = save_exported(out, tmp_path / "model")
    return info["weights"], info["spec"]


def test_corrupted_tensor_data(saved):
    weights, _ = saved
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the last tensor
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{weights.name}.*corrupted"):
        load_exported(weights)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_file_structure(saved, damage):
    weights, _ = saved
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00" * 64 + raw[64:])
    with pytest.raises(ValueError, match=f"{weights.name}.*corrupted"):
        load_exported(weights)


def test_mismatched_spec(saved, tmp_path):
    weights, spec_path = saved
    spec = json.loads(spec_path.read_text())
    spec["tensors"]["1.weight"]["shape"] = [1, 1]
    spec_path.write_text(json.dumps(spec, indent=1, sort_keys=True))
    with pytest.raises(ValueError, match="does not belong to spec"):
        load_exported(weights)
    spec_path.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_exported(weights)
    # a spec that belongs to another export
    other = nn.Sequential(nn.Linear(64, 8))
    other_spec = save_exported(export(other, {}, "dense"), tmp_path / "other")["spec"]
    spec_path.write_bytes(other_spec.read_bytes())
    with pytest.raises(ValueError, match="does not belong to spec"):
        load_exported(weights)
    spec_path.unlink()
    with pytest.raises(FileNotFoundError):
        load_exported(weights)


def test_export_run(tmp_path):
    config = TrainConfig(dataset="digits", widths=[32], epochs=1, batch_size=128, update_interval=4,
                         method="srigl", sparsity=0.8, threads=1)
    train_mod.train(config, tmp_path / "run")
    result = export_run(tmp_path / "run", "condensed")
    assert result["weights"].is_file() and result["bytes"] > 0
    assert 0 < result["params"] < result["dense_params"]
    model, masks, _ = train_mod.load_trained(tmp_path / "run")
    loaded = load_exported(result["weights"])
    x = torch.randn(5, 1, 8, 8)
    assert_same_outputs(loaded, masked_reference(model, masks), x)


def test_always_sparse_layers_export():
    model = nn.Sequential(sparse_linear.SparseLinear(20, 32, fan_in=4), nn.ReLU(),
                          sparse_linear.SparseLinear(32, 5, fan_in=6))
    x = torch.randn(3, 20)
    for fmt, cls in (("condensed", CondensedLinear), ("csr", CSRLinear), ("dense", nn.Linear)):
        out = export(model, {}, fmt)
        assert type(out[0]) is cls and type(out[2]) is cls
        assert {r["nnz"] for r in out.regrow_export_report} == {128, 30}
        assert_same_outputs(out, model, x)


def test_export_run_of_an_always_sparse_run(tmp_path):
    config = TrainConfig(dataset="digits", widths=[32], epochs=1, batch_size=128, update_interval=4,
                         method="set", sparsity=0.8, threads=1, backend="sparse")
    train_mod.train(config, tmp_path / "run")
    result = export_run(tmp_path / "run", "csr")
    assert result["dense_params"] == 64 * 32 + 32 + 32 * 10 + 10
    model, _, _ = train_mod.load_trained(tmp_path / "run")
    x = torch.randn(5, 1, 8, 8)
    assert_same_outputs(load_exported(result["weights"]), model.eval(), x)
