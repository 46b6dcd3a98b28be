"""CIFAR ResNets: ResNet-20/32/56 (He et al. 2016, section 4.2) and the CIFAR ResNet-18."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._shapes import image_shape, scaled

SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        self.pad_lo, self.pad_hi = extra // 2, extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem (no max pool), stages of basic blocks, global average pool, linear head.

    The first stage keeps the resolution, each later stage halves it; the final pool is
    adaptive, so inputs as small as 1x1 work.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        stage_planes: Sequence[int],
        blocks_per_stage: Sequence[int],
        shortcut: str,
    ) -> None:
        super().__init__()
        shortcut = shortcut.upper()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        stem = stage_planes[0]
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        stages: list[nn.Module] = []
        in_planes = stem
        for i, (planes, n) in enumerate(zip(stage_planes, blocks_per_stage)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.stages(x))
        return self.fc(torch.flatten(x, 1))


def _cifar_resnet(depth: int, num_classes: int, in_shape: tuple[int, ...], width: float, shortcut: str) -> ResNet:
    c, _, _ = image_shape(in_shape, f"resnet{depth}")
    n = (depth - 2) // 6
    planes = [scaled(p, width) for p in (16, 32, 64)]
    return ResNet(c, num_classes, planes, [n, n, n], shortcut)


def resnet20(num_classes: int, in_shape: tuple[int, ...], width: float = 1.0, shortcut: str = "A") -> ResNet:
    """ResNet-20 (0.27M parameters on CIFAR-10 with the default option-A shortcut)."""
    return _cifar_resnet(20, num_classes, in_shape, width, shortcut)


def resnet32(num_classes: int, in_shape: tuple[int, ...], width: float = 1.0, shortcut: str = "A") -> ResNet:
    """ResNet-32 (0.46M parameters on CIFAR-10 with the default option-A shortcut)."""
    return _cifar_resnet(32, num_classes, in_shape, width, shortcut)


def resnet56(num_classes: int, in_shape: tuple[int, ...], width: float = 1.0, shortcut: str = "A") -> ResNet:
    """ResNet-56 (0.85M parameters on CIFAR-10 with the default option-A shortcut)."""
    return _cifar_resnet(56, num_classes, in_shape, width, shortcut)


def resnet18(num_classes: int, in_shape: tuple[int, ...], width: float = 1.0, shortcut: str = "B") -> ResNet:
    """CIFAR ResNet-18: 3x3 stem, no max pool, 64-128-256-512 (11.17M parameters on CIFAR-10)."""
    c, _, _ = image_shape(in_shape, "resnet18")
    planes = [scaled(p, width) for p in (64, 128, 256, 512)]
    return ResNet(c, num_classes, planes, [2, 2, 2, 2], shortcut)
