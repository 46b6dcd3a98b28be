"""In-memory datasets, the split container and the validation carve-out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import CropFlip


class ArrayDataset(Dataset):
    """Samples held as one tensor, normalised (and optionally augmented) on access.

    Raw values are kept in their stored dtype (uint8 for images: 4x less memory than
    float32) and mapped to float32 as ``(x * scale - mean[c]) / std[c]``.

    Besides the ``Dataset`` protocol, ``get_batch(indices)`` returns a whole batch with one
    vectorised call, which is much faster than a DataLoader's per-sample collation; both
    paths give identical values. With augmentation, call ``set_epoch(e)`` at the start of
    each epoch (see ``regrow.data.augment``).

    Attributes:
        data: raw samples, [N, *in_shape].
        targets: int64 labels, [N].
    """

    def __init__(
        self,
        data: torch.Tensor,
        targets: torch.Tensor,
        *,
        scale: float = 1.0,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        augment: CropFlip | None = None,
    ) -> None:
        if len(data) != len(targets):
            raise ValueError(f"data has {len(data)} samples but targets has {len(targets)}")
        if data.dim() < 2:
            raise ValueError(f"data must be [N, *sample_shape] with a sample dimension, got shape {tuple(data.shape)}")
        self.data = data
        self.targets = targets.to(torch.int64)
        self.scale = float(scale)
        channels = data.shape[1]  # per-channel constants broadcast over [B, C, ...]
        shape = (1, -1) + (1,) * (data.dim() - 2)
        self._mean = torch.as_tensor(mean, dtype=torch.float32).expand(channels).reshape(shape)
        self._std = torch.as_tensor(std, dtype=torch.float32).expand(channels).reshape(shape)
        if augment is not None and data.dim() != 4:
            raise ValueError("crop/flip augmentation needs image samples [N, C, H, W]")
        self.augment = augment
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (no effect without augmentation)."""
        self.epoch = int(epoch)

    def get_batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (and augmented) samples ``indices`` as float32 [B, *in_shape], and labels [B]."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = (self.data[idx].to(torch.float32) * self.scale - self._mean) / self._std
        if self.augment is not None:
            fill = (-self._mean / self._std).flatten()
            x = self.augment(x, idx, self.epoch, fill)
        return x, self.targets[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([int(i)]))
        return x[0], y[0]

    def subset(self, indices: torch.Tensor, *, augment: CropFlip | None = None) -> ArrayDataset:
        """Samples ``indices`` (copied) with the same normalisation, augmented by ``augment``."""
        return self._derive(self.data[indices], self.targets[indices], augment)

    def with_augment(self, augment: CropFlip | None) -> ArrayDataset:
        """The same samples (shared, not copied) with augmentation ``augment``."""
        return self._derive(self.data, self.targets, augment)

    def _derive(self, data: torch.Tensor, targets: torch.Tensor, augment: CropFlip | None) -> ArrayDataset:
        return ArrayDataset(
            data,
            targets,
            scale=self.scale,
            mean=self._mean.flatten().tolist(),
            std=self._std.flatten().tolist(),
            augment=augment,
        )


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded data set: ``train``, ``test`` and an optional ``val`` split.

    ``in_shape`` is the per-sample shape (e.g. ``(1, 28, 28)``), ``classes`` the class
    names when the files provide them (else ``None``).
    """

    name: str
    train: ArrayDataset
    test: ArrayDataset
    val: ArrayDataset | None
    in_shape: tuple[int, ...]
    num_classes: int
    classes: tuple[str, ...] | None = None


def carve_validation(
    train: ArrayDataset, val_fraction: float, seed: int, augment: CropFlip | None
) -> tuple[ArrayDataset, ArrayDataset | None]:
    """Split ``val_fraction`` of ``train`` off at random (seeded); only the rest is augmented."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(train)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and not 0 < n_val < n:
        raise ValueError(f"val_fraction {val_fraction} of {n} training samples leaves an empty split")
    if n_val == 0:
        return train.with_augment(augment), None
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return train.subset(train_idx, augment=augment), train.subset(val_idx, augment=None)
