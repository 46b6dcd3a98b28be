"""CNNs made always-sparse: ``regrow.nn.sparsify`` turns nn.Conv2d into SparseConv2d (with the
masked backend's allocation, batch norm, pooling and residuals untouched, clear refusals),
FLOPs count a SparseConv2d like a masked conv, and ``regrow train --backend sparse`` trains
the zoo's CNNs and rewires their convolutions."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from regrow.core.density import allocate_counts
from regrow.experiments.cli import main
from regrow.experiments.export_run import export_run
from regrow.experiments.flops import measure_layer_flops
from regrow.models import build
from regrow.nn import SparseConv2d, SparseLinear, sparsify


def small_resnet():
    torch.manual_seed(0)
    return build("resnet20", 10, (3, 8, 8), width=0.25, shortcut="B")


def test_sparsify_converts_every_conv_of_a_resnet_with_the_masked_allocation():
    dense = small_resnet()
    shapes = {name.removesuffix(".weight"): tuple(p.shape) for name, p in dense.named_parameters()
              if name.endswith("weight") and p.dim() > 1}
    model = sparsify(small_resnet(), sparsity=0.9, distribution="erk", seed=3)
    want = allocate_counts(shapes, 0.1, "erk")
    modules = dict(model.named_modules())
    assert {n: modules[n].nnz for n in shapes} == want
    for name, module in dense.named_modules():
        new = modules[name]
        if isinstance(module, nn.Conv2d):
            assert isinstance(new, SparseConv2d)
            assert (new.kernel_size, new.stride, new.padding, new.dilation) == \
                (module.kernel_size, module.stride, module.padding, module.dilation)
            assert (new.bias is None) == (module.bias is None)
        elif isinstance(module, nn.Linear):
            assert isinstance(new, SparseLinear)
        else:   # batch norm, pooling, residual blocks and their shortcut containers stay as they are
            assert type(new) is type(module), name
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_sparsify_fan_in_gives_every_output_channel_its_taps():
    model = sparsify(nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)), fan_in=12)
    first, second = model[0], model[2]
    assert torch.equal(first.row_indices.bincount(minlength=8), torch.full((8,), 12))   # 12 of 2*3*3
    assert torch.equal(second.row_indices.bincount(minlength=4), torch.full((4,), 8))   # all 8 of 8*1*1


@pytest.mark.parametrize("padding, kernel, dilation", [("valid", 3, 1), ("same", 3, 1), ("same", 2, 2), ((1, 2), 3, 1)])
def test_sparsify_keeps_the_convs_geometry(padding, kernel, dilation):
    conv = nn.Conv2d(3, 4, kernel, padding=padding, dilation=dilation)
    model = sparsify(nn.Sequential(conv), sparsity=0.5)
    x = torch.randn(2, 3, 9, 8)
    assert model(x).shape == conv(x).shape


class _ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("layer, reason", [
    (nn.Conv2d(4, 4, 3, groups=2), "groups=2: SparseConv2d is a groups=1 convolution"),
    (nn.Conv2d(4, 4, 3, groups=4), "groups=4"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (nn.Conv2d(4, 4, 2, padding="same"), "padding='same' that pads unevenly"),
    (nn.Conv1d(4, 4, 3), "Conv1d: only nn.Conv2d has an always-sparse counterpart so far"),
    (nn.Conv3d(4, 4, 3), "Conv3d: only nn.Conv2d"),
    (_ScaledConv(4, 4, 3), "_ScaledConv overrides nn.Conv2d.forward"),
])
def test_sparsify_refuses_convs_it_cannot_convert_and_dense_layers_keeps_them(layer, reason):
    with pytest.raises(ValueError, match=rf"cannot convert '0': {reason}.*dense_layers=\['0'\]"):
        sparsify(nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3)), sparsity=0.5)
    model = sparsify(nn.Sequential(layer, nn.Flatten(), nn.Linear(4, 3)), sparsity=0.5, dense_layers=["0"])
    assert model[0] is layer and isinstance(model[2], SparseLinear)


def test_flops_count_a_sparse_conv_as_a_masked_conv_of_its_density():
    dense = small_resnet()
    sparse = sparsify(small_resnet(), sparsity=0.9)
    a, b = measure_layer_flops(dense, (3, 8, 8)), measure_layer_flops(sparse, (3, 8, 8))
    renamed = {name.replace(".values", ".weight"): f for name, f in b.per_param.items()}
    assert renamed == pytest.approx(a.per_param) and "conv1.values" in b.per_param
    densities = {name: m.density for name, m in sparse.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))}
    expected = sum(a.per_param[f"{name}.weight"] * d for name, d in densities.items())
    assert b.forward({f"{name}.values": d for name, d in densities.items()}) == pytest.approx(expected)
    assert expected < 0.5 * a.dense


@pytest.mark.parametrize("model, options, method", [("resnet20", "width=0.25", "rigl"),
                                                    ("vgg11", "width=0.0625", "gse")])
def test_regrow_train_backend_sparse_trains_a_cnn_and_rewires_its_convs(tmp_path, capsys, model, options, method):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "digits", "--model", model, "--model-option", options, "--backend", "sparse",
                 "--method", method, "--sparsity", "0.8", "--epochs", "1", "--batch-size", "480",
                 "--update-interval", "1", "--stop-fraction", "1.0", "--threads", "1", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "sparse" and summary["updates"] == summary["steps"] - 1 == 2
    assert summary["final_density"] == pytest.approx(0.2, abs=0.01)
    updates = [json.loads(line) for line in (out / "updates.jsonl").read_text().splitlines()]
    convs = [name for name in updates[0]["layers"] if "conv" in name or name.startswith("features")]
    assert convs and all(name.endswith(".values") for name in convs)
    rewired = sum(sum(u["layers"][name]) for u in updates for name in convs)
    assert rewired > 0, "the convolutions' topology was updated"
    exported = export_run(out, "condensed")   # the run exports: convs as nn.Conv2d with their zeros
    assert exported["dense_params"] == summary["params"]["total"] >= exported["params"] > 0


SMALL = {"lenet5": {}, "resnet20": {"width": 0.25}, "resnet32": {"width": 0.25}, "resnet56": {"width": 0.25},
         "resnet18": {"width": 0.0625}, "vgg11": {"width": 0.0625}, "vgg16": {"width": 0.0625},
         "vgg19": {"width": 0.0625}}


@pytest.mark.parametrize("name", SMALL)
def test_every_cnn_of_the_zoo_trains_always_sparse(name):
    import regrow
    torch.manual_seed(0)
    model = sparsify(build(name, 4, (3, 8, 8), **SMALL[name]), sparsity=0.9)
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dst = regrow.DynamicSparsity(model, optimizer, method="rigl", sparsity=0.9, total_steps=4, update_interval=1,
                                 stop_fraction=1.0)
    counts = {t.name: t.nnz for t in dst.targets}
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        dst.step()
    assert dst.stats()["updates"] == 2
    assert {t.name: t.nnz for t in dst.targets} == counts
    assert sum(c["grown"] for c in dst.last_update["layers"].values()) > 0
