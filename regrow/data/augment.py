"""Random crop + horizontal flip from a counter-based (stateless) seeded random stream.

The random choices for a sample are a hash of ``(seed, epoch, index)``, not draws from a
stateful generator. So the same sample in the same epoch is always augmented the same
way, whatever the batch order, the DataLoader worker that loads it, or whether training
was interrupted and resumed: there is no generator state to checkpoint. Only the epoch
has to be set (``ArrayDataset.set_epoch``), as with ``DistributedSampler``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * (c & 0xFFFF)) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def hash32(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """Well-mixed 32-bit hash of (seed, epoch, index) per element of ``index`` (int64 in, int64 out).

    The finaliser is Chris Wellons' "lowbias32"; seed and epoch are folded in with odd
    constants so different seeds or epochs give unrelated streams.
    """
    key = (int(seed) * 0x9E3779B1 + int(epoch) * 0x85EBCA77) & _MASK32
    x = (_mul32(index.to(torch.int64) & _MASK32, 0xC2B2AE3D) ^ key) & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@dataclass(frozen=True)
class CropFlip:
    """Random crop to the original size after zero padding, and a random horizontal flip.

    ``fill`` is the per-channel value of a black pixel after normalisation, so padding
    looks as it does when cropping is done before normalising (torchvision's order).
    """

    padding: int = 4
    flip: bool = True
    seed: int = 0

    def __call__(self, x: torch.Tensor, index: torch.Tensor, epoch: int, fill: torch.Tensor) -> torch.Tensor:
        """Augment a batch ``x`` [B, C, H, W] whose sample ids are ``index`` [B]."""
        b, c, h, w = x.shape
        p = self.padding
        r = hash32(self.seed, epoch, index)
        span = 2 * p + 1
        dy, dx, flip = r % span, (r // span) % span, (r // (span * span)) % 2
        if p > 0:
            padded = fill.to(x.dtype).view(1, c, 1, 1).repeat(b, 1, h + 2 * p, w + 2 * p)
            padded[:, :, p : p + h, p : p + w] = x
            rows = (dy[:, None] + torch.arange(h)).view(b, 1, h, 1)
            cols = (dx[:, None] + torch.arange(w)).view(b, 1, 1, w)
            batch = torch.arange(b).view(b, 1, 1, 1)
            chan = torch.arange(c).view(1, c, 1, 1)
            x = padded[batch, chan, rows, cols]
        if self.flip:
            x = torch.where(flip.bool().view(b, 1, 1, 1), x.flip(-1), x)
        return x
