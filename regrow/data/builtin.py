"""Data sets that need no files: scikit-learn's digits and a generated Gaussian-cluster set.

Their train/test splits are fixed (seed 0), independent of the run seed, so runs with
different seeds are scored on the same test set.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import ArrayDataset

_SPLIT_SEED = 0


def _standardised(
    x_train: np.ndarray, x_test: np.ndarray, y_train: np.ndarray, y_test: np.ndarray, scale: float
) -> tuple[ArrayDataset, ArrayDataset]:
    """Wrap as datasets normalised by the training set's overall mean and std."""
    mean = float((x_train * scale).mean())
    std = float((x_train * scale).std())

    def make(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        data = torch.from_numpy(np.ascontiguousarray(x))
        return ArrayDataset(data, torch.from_numpy(y.astype(np.int64)), scale=scale, mean=(mean,), std=(std,))

    return make(x_train, y_train), make(x_test, y_test)


def load_digits() -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 8x8 digits (1797 images, 10 classes): stratified 1437 train / 360 test."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # values 0..16, [N, 1, 8, 8]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=360, stratify=bunch.target, random_state=_SPLIT_SEED
    )
    return _standardised(x_tr, x_te, y_tr, y_te, scale=1 / 16)


SYNTHETIC_SHAPE = (1, 8, 8)


def load_synthetic(n_train: int = 2000, n_test: int = 500) -> tuple[ArrayDataset, ArrayDataset]:
    """A generated 10-class problem: Gaussian clusters (two per class) in 64 dimensions.

    Built with scikit-learn's ``make_classification`` (16 informative dimensions, 2%
    flipped labels, seed 0), reshaped to 1x8x8 so that every model, convolutional ones
    included, can run on it; the "pixels" have no spatial structure. Meant for fast tests.
    """
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n_train + n_test,
        n_features=64,
        n_informative=16,
        n_redundant=8,
        n_classes=10,
        n_clusters_per_class=2,
        flip_y=0.02,
        class_sep=1.5,
        random_state=_SPLIT_SEED,
    )
    x = x.astype(np.float32).reshape(-1, *SYNTHETIC_SHAPE)
    return _standardised(x[:n_train], x[n_train:], y[:n_train], y[n_train:], scale=1.0)
