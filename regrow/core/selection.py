"""Deterministic top-k selection, with ties broken by a seeded hash of each position.

``torch.topk`` leaves the order of equal values unspecified, which would let two ranks (or
two runs) pick different weights among ties. Selecting everything strictly above the k-th
value and then the tied positions in a fixed order is O(n) and reproducible everywhere.

Which order for the ties? By lowest position (the default when no ``tie_keys`` are given)
is reproducible but biased: among zero-gradient candidates (inputs that are always zero,
such as blank border pixels) growth would always take the first columns. So every method
passes ``tie_keys``: a counter-based hash (splitmix64) of (seed, update step, layer,
position). It depends on nothing but integers every rank and every backend agree on, so
DDP masks still agree and the masked and always-sparse backends pick the same ties, while
the order of tied positions is a fresh pseudo-random one at every update.
"""
from __future__ import annotations

import zlib

import torch

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores it."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors (wrapping arithmetic), bit-exact.

    A bijection on 64-bit words, so distinct inputs never collide.
    """
    z = x.to(torch.int64) + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def splitmix64_int(x: int) -> int:
    """The same function on a Python int (used to fold the counters into one word)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def layer_id(name: str) -> int:
    """A layer's number for hashing: CRC32 of its name (Python's hash() differs per process)."""
    return zlib.crc32(name.encode())


def tie_keys(positions: torch.Tensor, seed: int, step: int, layer: str) -> torch.Tensor:
    """int64 tie-break keys of flat ``positions``: splitmix64 of (seed, step, layer, position).

    Equal scores are then ordered by descending key: the same order on every rank and in
    every backend, a different one at each update step and for each seed and layer.
    """
    salt = splitmix64_int(splitmix64_int(splitmix64_int(seed & _MASK64) ^ (step & _MASK64)) ^ layer_id(layer))
    return splitmix64(positions.to(torch.int64) ^ _signed(salt))


def largest_k(scores: torch.Tensor, k: int, *, tie_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the k largest scores, returned sorted ascending.

    Ties at the k-th value go to the largest ``tie_keys`` (aligned with ``scores``) when
    given, else to the lower positions.
    """
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if k >= n:
        return torch.arange(n, device=scores.device)
    # the k-th largest value by selection (kthvalue), 20-30% faster than topk at k ~ n / 4
    kth = torch.kthvalue(scores.reshape(-1), n - k + 1).values
    chosen = scores > kth
    ties = (scores == kth).nonzero().squeeze(1)
    need = k - int(chosen.sum())
    if tie_keys is not None and ties.numel() > need:
        ties = ties[torch.topk(tie_keys.reshape(-1)[ties], need, sorted=False).indices]
    chosen[ties[:need]] = True
    return chosen.nonzero().squeeze(1)   # ascending, without a sort of the k positions


def smallest_k(scores: torch.Tensor, k: int, *, tie_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the k smallest scores, sorted ascending; ties as in :func:`largest_k`."""
    return largest_k(-scores, k, tie_keys=tie_keys)
