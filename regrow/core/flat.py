"""Flat (row-major) indexing of tensors whatever their memory layout.

Masks and topology decisions address weights by flat index ``row * cols + col``. A parameter
may be stored in another layout (channels_last convolutions), where ``view(-1)`` fails, so
writes go through these helpers.
"""
from __future__ import annotations

import torch

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def put_flat(t: torch.Tensor, flat: torch.Tensor, values) -> None:
    """``t.view(-1)[flat] = values`` for any memory layout, in place."""
    if t.is_contiguous():
        t.view(-1)[flat] = values
    else:
        t[torch.unravel_index(flat, t.shape)] = values


def keep_bits(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mask as an integer tensor of ``like``'s element size: all bits set where active.

    AND-ing a float tensor's bits with it zeroes inactive entries *exactly*, NaN and inf
    included (a multiply by 0 would keep them), and is as fast as a multiply on CPU (masked_fill
    is about 10x slower).
    """
    int_dtype = _SAME_SIZE_INT[like.element_size()]
    # the two values on the mask's device: torch.where with a CUDA condition and CPU values is
    # refused by some torch versions ("Expected condition, x and y to be on the same device")
    on, off = (torch.tensor(v, dtype=int_dtype, device=mask.device) for v in (-1, 0))
    return torch.where(mask, on, off).to(like.device)


def and_bits_(t: torch.Tensor, bits: torch.Tensor) -> None:
    """Zero ``t`` where ``bits`` is 0, in place (see :func:`keep_bits`)."""
    t.view(bits.dtype).bitwise_and_(bits)
