"""Data sets: ``load(name, data_dir)`` returns train/test (and optional validation) splits.

=============  ==========  =======  ==============================================  =========
name           in_shape    classes  source                                          augment
=============  ==========  =======  ==============================================  =========
digits         (1, 8, 8)   10       scikit-learn, built in; 1437 train / 360 test    no
synthetic      (1, 8, 8)   10       generated Gaussian clusters; 2000 / 500           no
mnist          (1, 28, 28) 10       IDX files in data_dir; 60000 / 10000             no
fashion-mnist  (1, 28, 28) 10       IDX files in data_dir; 60000 / 10000             no
cifar10        (3, 32, 32) 10       python pickles in data_dir; 50000 / 10000        crop+flip
cifar100       (3, 32, 32) 100      python pickles in data_dir; 50000 / 10000        crop+flip
=============  ==========  =======  ==============================================  =========

Nothing is ever downloaded. Samples are kept in memory in their stored dtype and come
out as normalised float32 tensors; see ``ArrayDataset`` for the fast ``get_batch`` path
and ``set_epoch`` (needed each epoch when augmenting).
"""

from __future__ import annotations

from pathlib import Path

from .augment import CropFlip
from .base import ArrayDataset, DatasetSplits, carve_validation
from .builtin import load_digits, load_synthetic
from .cifar import CIFAR, load_cifar
from .idx import MNIST_LIKE, load_mnist_like, read_idx

DATASETS: tuple[str, ...] = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10", "cifar100")

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}

# Datasets with a defined augmentation, and whether it is on by default for training.
_AUGMENTABLE = tuple(CIFAR)


def load(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_fraction: float = 0.0,
    augment: bool | None = None,
    seed: int = 0,
) -> DatasetSplits:
    """Load data set ``name`` with its published train/test split.

    Args:
        name: one of ``DATASETS`` (case-insensitive).
        data_dir: folder with the files (mnist, fashion-mnist, cifar10, cifar100); unused by
            the built-in sets.
        val_fraction: fraction of the training set held out (seeded, unstratified) as ``val``.
        augment: random crop (padding 4) + horizontal flip on the training split. ``None``
            means on for CIFAR, off otherwise; only CIFAR supports it.
        seed: seeds the validation carve-out and the augmentation stream. Test sets (and the
            built-in train/test splits) never depend on it.

    Raises:
        ValueError: unknown name, bad option, damaged file, or missing ``data_dir``.
        FileNotFoundError: a required file is absent (the message gives the expected layout).
    """
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if augment is None:
        augment = key in _AUGMENTABLE
    elif augment and key not in _AUGMENTABLE:
        raise ValueError(f"augmentation is defined for {', '.join(_AUGMENTABLE)} only, not {key!r}")

    classes = None
    if key == "digits":
        train, test = load_digits()
    elif key == "synthetic":
        train, test = load_synthetic()
    else:
        if data_dir is None:
            raise ValueError(f"dataset {key!r} is read from files: pass data_dir")
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data_dir {root} is not a directory")
        if key in MNIST_LIKE:
            train, test = load_mnist_like(key, root)
        else:
            train, test, classes = load_cifar(key, root)

    num_classes = int(CIFAR[key]["num_classes"]) if key in CIFAR else 10
    crop_flip = CropFlip(padding=4, flip=True, seed=seed) if augment else None
    train, val = carve_validation(train, val_fraction, seed, crop_flip)
    return DatasetSplits(
        name=key,
        train=train,
        test=test,
        val=val,
        in_shape=train.in_shape,
        num_classes=num_classes,
        classes=classes,
    )


__all__ = ["DATASETS", "ArrayDataset", "CropFlip", "DatasetSplits", "load", "read_idx"]
