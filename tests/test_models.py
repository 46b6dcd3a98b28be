"""Tests for regrow.models: shapes, gradients, published parameter counts, option handling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regrow.models import MODELS, build, model_options

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


# Small configurations so that every model runs on every shape in milliseconds.
SMALL = {
    "resnet20": {"width": 0.25},
    "resnet32": {"width": 0.25},
    "resnet56": {"width": 0.25},
    "resnet18": {"width": 0.0625},
    "vgg11": {"width": 0.0625},
    "vgg16": {"width": 0.0625},
    "vgg19": {"width": 0.0625},
    "vit": {"dim": 16, "depth": 1, "heads": 2},
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(name: str, num_classes: int, in_shape: tuple[int, ...], **options) -> nn.Module:
    """Build on the meta device: parameter counts without allocating or initialising weights."""
    with torch.device("meta"):
        return build(name, num_classes, in_shape, **options)


@pytest.mark.parametrize("in_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name: str, in_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build(name, 7, in_shape, **SMALL.get(name, {}))
    x = torch.randn(3, *in_shape)
    out = model(x)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), pname
    # every sparsifiable weight must receive a non-zero gradient, or growth scores are blind
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert m.weight.grad.abs().sum() > 0, f"{name}: zero gradient for {mname}.weight"


@pytest.mark.parametrize("name", MODELS)
def test_eval_mode_batch_of_one(name: str) -> None:
    model = build(name, 10, (1, 8, 8), **SMALL.get(name, {})).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_init(name: str) -> None:
    torch.manual_seed(3)
    a = build(name, 10, (3, 32, 32), **SMALL.get(name, {}))
    torch.manual_seed(3)
    b = build(name, 10, (3, 32, 32), **SMALL.get(name, {}))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


# Published counts: LeNet-300-100 (LeCun et al. 1998; 266,610 with biases); CIFAR ResNets
# (He et al. 2016, table 6: 0.27M, 0.46M, 0.85M; exact values of the option-A reference
# implementation, akamaster/pytorch_resnet_cifar10); CIFAR ResNet-18 (kuangliu/pytorch-cifar).
@pytest.mark.parametrize(
    "name,in_shape,options,expected",
    [
        ("mlp", (1, 28, 28), {}, 266_610),
        ("mlp", (1, 28, 28), {"widths": (1000, 1000, 1000)}, 2_797_010),  # SET's 784-1000-1000-1000-10
        ("lenet5", (1, 28, 28), {}, 61_706),
        ("lenet5", (3, 32, 32), {}, 62_006),
        ("resnet20", (3, 32, 32), {}, 269_722),
        ("resnet32", (3, 32, 32), {}, 464_154),
        ("resnet56", (3, 32, 32), {}, 853_018),
        ("resnet20", (3, 32, 32), {"shortcut": "B"}, 272_474),
        ("resnet18", (3, 32, 32), {}, 11_173_962),
    ],
)
def test_published_parameter_counts(name: str, in_shape, options, expected: int) -> None:
    assert n_params(build_meta(name, 10, in_shape, **options)) == expected


@pytest.mark.parametrize("name,millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85)])
def test_resnet_counts_round_to_paper(name: str, millions: float) -> None:
    assert round(n_params(build_meta(name, 10, (3, 32, 32))) / 1e6, 2) == millions


VGG_CONV = {
    "vgg11": [64, 128, 256, 256, 512, 512, 512, 512],
    "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    "vgg19": [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512],
}


@pytest.mark.parametrize("name", sorted(VGG_CONV))
def test_vgg_parameter_counts(name: str) -> None:
    # conv 3x3 without bias + BN (weight, bias) per layer, then a 512 -> 10 linear classifier
    expected, prev = 0, 3
    for c in VGG_CONV[name]:
        expected += 9 * prev * c + 2 * c
        prev = c
    expected += 512 * 10 + 10
    model = build_meta(name, 10, (3, 32, 32))
    assert n_params(model) == expected
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == len(VGG_CONV[name])


def test_lenet_flatten_size_follows_input() -> None:
    def fc1_in(shape):
        return next(m for m in build_meta("lenet5", 10, shape).modules() if isinstance(m, nn.Linear)).in_features

    assert fc1_in((1, 28, 28)) == 16 * 5 * 5
    assert fc1_in((3, 32, 32)) == 16 * 5 * 5
    assert fc1_in((1, 8, 8)) == 16 * 2 * 2


def test_mlp_layer_names() -> None:
    names = [n for n, p in build_meta("mlp", 10, (1, 28, 28)).named_parameters() if p.dim() == 2]
    assert names == ["net.fc1.weight", "net.fc2.weight", "net.fc3.weight"]


def test_mlp_flattens_any_shape() -> None:
    model = build("mlp", 4, (64,), widths=(8,))
    assert model(torch.randn(5, 64)).shape == (5, 4)
    assert build("mlp", 4, (2, 3, 5), widths=())(torch.randn(5, 2, 3, 5)).shape == (5, 4)


def test_width_multiplier_scales_channels() -> None:
    full = build_meta("resnet20", 10, (3, 32, 32))
    half = build_meta("resnet20", 10, (3, 32, 32), width=0.5)
    assert full.fc.in_features == 64 and half.fc.in_features == 32
    assert build_meta("vgg16", 10, (3, 32, 32), width=0.25).classifier.in_features == 128


def test_option_a_shortcut_is_parameter_free() -> None:
    a = build_meta("resnet20", 10, (3, 32, 32), shortcut="A")
    b = build_meta("resnet20", 10, (3, 32, 32), shortcut="B")
    convs = lambda m: sum(isinstance(x, nn.Conv2d) for x in m.modules())  # noqa: E731
    assert convs(a) == 19 and convs(b) == 21  # B adds a 1x1 projection at each of 2 downsamplings


def test_vit_structure() -> None:
    model = build("vit", 10, (3, 32, 32), dim=32, depth=2, heads=4)
    attn = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attn) == 2 and all(m.batch_first for m in attn)
    assert attn[0].in_proj_weight.shape == (96, 32)  # packed q, k, v: sparsifiable as one weight
    assert isinstance(model.patch_embed, nn.Conv2d) and model.patch_embed.stride == (4, 4)
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 32)  # 64 patches + class token
    assert build_meta("vit", 10, (1, 28, 28)).pos_embed.shape[1] == 7 * 7 + 1


def test_vit_eval_matches_train_without_dropout() -> None:
    # nn.MultiheadAttention takes a fused fast path in eval mode; it must compute the same function
    torch.manual_seed(0)
    model = build("vit", 10, (1, 8, 8), dim=16, depth=2, heads=2)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    torch.testing.assert_close(train_out, eval_out, rtol=1e-4, atol=1e-5)


def test_vit_masked_in_proj_changes_output() -> None:
    # zeroing in_proj_weight in place (as the masked backend does) must reach the output
    torch.manual_seed(0)
    model = build("vit", 10, (1, 8, 8), dim=16, depth=1, heads=2).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        model.blocks[0].attn.in_proj_weight.mul_(torch.rand(48, 16) > 0.5)
        assert not torch.allclose(before, model(x))


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet99'.*resnet20.*vit"):
        build("resnet99", 10, (3, 32, 32))


def test_names_are_case_insensitive() -> None:
    assert isinstance(build("ResNet20", 10, (3, 8, 8), width=0.25), nn.Module)


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ValueError, match="no option.*depth.*valid: widths"):
        build("mlp", 10, (1, 28, 28), depth=3)
    assert model_options("resnet18") == {"width": 1.0, "shortcut": "B"}


@pytest.mark.parametrize(
    "name,in_shape,options,match",
    [
        ("lenet5", (64,), {}, r"needs an image input shape \(C, H, W\)"),
        ("resnet20", (3, 32), {}, "needs an image input shape"),
        ("resnet20", (3, 32, 32), {"shortcut": "C"}, "shortcut must be one of"),
        ("vgg11", (3, 32, 32), {"width": 0}, "width multiplier must be positive"),
        ("vit", (3, 32, 32), {"patch_size": 5}, "patch_size 5 must divide"),
        ("vit", (3, 32, 32), {"dim": 30, "heads": 4}, "divisible by heads"),
        ("mlp", (1, 28, 28), {"widths": (10, 0)}, "widths must be positive"),
    ],
)
def test_bad_configurations_raise(name, in_shape, options, match) -> None:
    with pytest.raises(ValueError, match=match):
        build(name, 10, in_shape, **options)


def test_zero_classes_raise() -> None:
    with pytest.raises(ValueError, match="num_classes must be at least 1"):
        build("mlp", 0, (1, 28, 28))
