"""Input-shape checks shared by the model builders."""

from __future__ import annotations


def image_shape(in_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    """Return ``in_shape`` as ``(C, H, W)``, or raise a one-line ValueError.

    Convolutional models need a channel and two spatial dimensions; a flat vector
    (e.g. from a tabular data set) is only accepted by the MLP.
    """
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"model {model!r} needs an image input shape (C, H, W) with positive sizes, got {tuple(in_shape)}"
        )
    return shape  # type: ignore[return-value]


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels * width``, rounded, never below 1."""
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    return max(1, int(round(channels * width)))
