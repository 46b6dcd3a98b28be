"""LeNet-5 style CNN: two 5x5 convolutions with max pooling, then 120-84-classes."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._shapes import image_shape


def _conv_pool_size(size: int, padding: int) -> int:
    """Spatial size after a 5x5 convolution (stride 1) and a 2x2 max pool with ceil_mode."""
    return math.ceil((size + 2 * padding - 4) / 2)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling (the modern reading of LeCun et al. 1998).

    Padding follows the classic setups and keeps small inputs valid: the first
    convolution pads by 2 below 32 pixels (MNIST's 28x28 becomes LeNet's 32x32) and not
    at 32 or above (CIFAR); the second is unpadded unless its input is under 5 pixels
    (e.g. 8x8 digits). Pools use ceil_mode so a 1-pixel map stays 1 pixel. The flatten
    size is computed from ``in_shape``: 16x5x5 for both 1x28x28 and 3x32x32.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        pad1 = 0 if min(h, w) >= 32 else 2
        h1, w1 = _conv_pool_size(h, pad1), _conv_pool_size(w, pad1)
        pad2 = 0 if min(h1, w1) >= 5 else 2
        h2, w2 = _conv_pool_size(h1, pad2), _conv_pool_size(w1, pad2)
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=pad1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(6, 16, 5, padding=pad2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h2 * w2, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def lenet5(num_classes: int, in_shape: tuple[int, ...]) -> LeNet5:
    """LeNet-5 for any ``(C, H, W)`` input (61,706 parameters on 1x28x28 with 10 classes)."""
    return LeNet5(image_shape(in_shape, "lenet5"), num_classes)
