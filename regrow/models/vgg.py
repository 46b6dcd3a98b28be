"""VGG-11/16/19 with batch norm, CIFAR style (one linear classifier on 512 features)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._shapes import image_shape, scaled

# Simonyan & Zisserman configurations A, D, E; "M" is a 2x2 max pool.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),
}


class VGG(nn.Module):
    """Conv3x3-BN-ReLU stacks with max pools, global average pool, linear classifier.

    Pools use ceil_mode and the final pool is adaptive, so inputs smaller than 32x32
    (down to 1x1) run; on 32x32 the final map is already 1x1 and the pool is a no-op.
    Convolutions have no bias since batch norm follows each one.
    """

    def __init__(self, in_channels: int, num_classes: int, config: Sequence[int | str], width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = scaled(int(v), width)
                layers += [nn.Conv2d(prev, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                prev = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg(name: str, num_classes: int, in_shape: tuple[int, ...], width: float) -> VGG:
    c, _, _ = image_shape(in_shape, name)
    return VGG(c, num_classes, CONFIGS[name], width)


def vgg11(num_classes: int, in_shape: tuple[int, ...], width: float = 1.0) -> VGG:
    """VGG-11 with batch norm (9.23M parameters on CIFAR-10)."""
    return _vgg("vgg11", num_classes, in_shape, width)


def vgg16(num_classes: int, in_shape: tuple[int, ...], width: float = 1.0) -> VGG:
    """VGG-16 with batch norm (14.72M parameters on CIFAR-10)."""
    return _vgg("vgg16", num_classes, in_shape, width)


def vgg19(num_classes: int, in_shape: tuple[int, ...], width: float = 1.0) -> VGG:
    """VGG-19 with batch norm (20.04M parameters on CIFAR-10)."""
    return _vgg("vgg19", num_classes, in_shape, width)
