"""Model zoo: ``build(name, num_classes, in_shape, **options)`` for the networks of the DST papers.

Every model is plain ``torch.nn`` (Linear, Conv2d, MultiheadAttention, BatchNorm, LayerNorm),
so the sparsifiable-layer finder sees standard layer types, and every model accepts small
inputs (1x8x8 digits) as well as 1x28x28 and 3x32x32 images.

==========  ====================================================  ==========================
name        network                                               options
==========  ====================================================  ==========================
mlp         ReLU MLP, flattens input (LeNet-300-100 by default)   widths=(300, 100)
lenet5      LeNet-5 style CNN                                     -
resnet20    CIFAR ResNet-20 (He et al. 2016)                      width=1.0, shortcut="A"
resnet32    CIFAR ResNet-32                                       width=1.0, shortcut="A"
resnet56    CIFAR ResNet-56                                       width=1.0, shortcut="A"
resnet18    ResNet-18, CIFAR variant (3x3 stem, no max pool)      width=1.0, shortcut="B"
vgg11       VGG-11 with batch norm, CIFAR style                   width=1.0
vgg16       VGG-16 with batch norm, CIFAR style                   width=1.0
vgg19       VGG-19 with batch norm, CIFAR style                   width=1.0
vit         small Vision Transformer                              patch_size=None, dim=64,
                                                                  depth=4, heads=4,
                                                                  mlp_ratio=2.0, dropout=0.0
==========  ====================================================  ==========================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from .lenet import LeNet5, lenet5
from .mlp import MLP, mlp
from .resnet import ResNet, resnet18, resnet20, resnet32, resnet56
from .vgg import VGG, vgg11, vgg16, vgg19
from .vit import ViT, vit

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "lenet5": lenet5,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "vit": vit,
}

MODELS: tuple[str, ...] = tuple(_BUILDERS)


def model_options(name: str) -> dict[str, object]:
    """The options ``build`` accepts for model ``name``, with their defaults."""
    builder = _builder(name)
    params = list(inspect.signature(builder).parameters.values())[2:]  # skip num_classes, in_shape
    return {p.name: p.default for p in params}


def build(name: str, num_classes: int, in_shape: tuple[int, ...], **options: object) -> nn.Module:
    """Build model ``name`` for inputs of shape ``in_shape`` (without the batch dimension).

    Args:
        name: one of ``MODELS`` (case-insensitive).
        num_classes: number of output logits.
        in_shape: per-sample input shape, ``(C, H, W)`` for images; the MLP accepts any shape.
        **options: model-specific options, see ``model_options(name)``.

    Returns:
        An ``nn.Module`` mapping ``[B, *in_shape]`` to ``[B, num_classes]``.

    Raises:
        ValueError: unknown name, unknown option, an option value of the wrong type, or an
            input shape the model cannot take.
    """
    builder = _builder(name)
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"model {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}"
        )
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    try:
        model = builder(int(num_classes), tuple(int(s) for s in in_shape), **options)
    except (TypeError, AttributeError) as err:
        if not options:
            raise
        # a value of the wrong type fails deep inside the builder ("'int' object is not iterable")
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise ValueError(f"model {name!r}: bad option value in {given} ({err}); "
                         f"defaults: {model_options(name)}") from None
    # how to rebuild it: lets regrow.save_exported describe the architecture without pickling code
    model.regrow_arch = {"name": name.lower(), "num_classes": int(num_classes),
                         "in_shape": [int(s) for s in in_shape], "options": dict(options)}
    return model


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _BUILDERS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}") from None


__all__ = [
    "MODELS",
    "build",
    "model_options",
    "MLP",
    "LeNet5",
    "ResNet",
    "VGG",
    "ViT",
]
