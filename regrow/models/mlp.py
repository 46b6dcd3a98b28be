"""Multi-layer perceptron (LeNet-300-100 by default; SET's 784-1000-1000-1000-10 via widths)."""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


def _check_widths(widths: object) -> tuple[int, ...]:
    """``widths`` as a tuple of ints; ValueError unless it is a sequence of positive integers."""
    def positive_int(w: object) -> bool:
        return (isinstance(w, numbers.Integral) and not isinstance(w, bool) and int(w) >= 1) or (
            isinstance(w, float) and w.is_integer() and w >= 1)
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not all(map(positive_int, widths)):
        raise ValueError(f"mlp widths must be positive integers, in a list (e.g. widths=[300, 100]), "
                         f"got {widths!r}")
    return tuple(int(w) for w in widths)


class MLP(nn.Module):
    """Fully connected ReLU network that flattens any input.

    Args:
        in_features: size of the flattened input.
        num_classes: number of outputs.
        widths: hidden layer sizes; ``()`` gives a linear classifier.
    """

    def __init__(self, in_features: int, num_classes: int, widths: Sequence[int] = (300, 100)) -> None:
        super().__init__()
        widths = _check_widths(widths)
        # named fc1..fcN so per-layer reports read "fc2.weight", not "net.3.weight"
        layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
        prev = in_features
        for i, w in enumerate(widths, start=1):
            layers[f"fc{i}"] = nn.Linear(prev, w)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            prev = w
        layers[f"fc{len(widths) + 1}"] = nn.Linear(prev, num_classes)
        self.net = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp(num_classes: int, in_shape: tuple[int, ...], widths: Sequence[int] = (300, 100)) -> MLP:
    """MLP over the flattened input; ``widths=(1000, 1000, 1000)`` is SET's MNIST network."""
    return MLP(math.prod(int(s) for s in in_shape), num_classes, widths)
