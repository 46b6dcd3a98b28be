"""MNIST and Fashion-MNIST from IDX files (gzip-compressed or raw).

Each file's content is checked against the published files' SHA-256 (:data:`PUBLISHED`): the
other data set's files are refused with a message naming both (the two have the same shapes,
so training would otherwise run without a word), and a file that matches neither is used with
a warning.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import ArrayDataset

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); multi-byte types are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# name -> (torchvision folder, mean, std); mean/std are the usual ones of the training images in [0, 1].
MNIST_LIKE = {
    "mnist": ("MNIST", 0.1307, 0.3081),
    "fashion-mnist": ("FashionMNIST", 0.2860, 0.3530),
}

# SHA-256 of the *decompressed* published files, so that a copy stored raw or re-gzipped is still
# recognised (the .gz files' own digests are in ../shared/data/*/SHA256SUMS; the tests check that
# these are their contents).
PUBLISHED: dict[str, tuple[str, str]] = {
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db": ("mnist", "train-images-idx3-ubyte"),
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5": ("mnist", "train-labels-idx1-ubyte"),
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7": ("mnist", "t10k-images-idx3-ubyte"),
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2": ("mnist", "t10k-labels-idx1-ubyte"),
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888": ("fashion-mnist", "train-images-idx3-ubyte"),
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9": ("fashion-mnist", "train-labels-idx1-ubyte"),
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b": ("fashion-mnist", "t10k-images-idx3-ubyte"),
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34": ("fashion-mnist", "t10k-labels-idx1-ubyte"),
}
TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def layout(name: str) -> str:
    """Human description of where the files of ``name`` are looked for."""
    folder = MNIST_LIKE[name][0]
    files = ", ".join(f for pair in _FILES.values() for f in pair)
    return (
        f"{name} expects the four IDX files {files} (each raw or with .gz) in DATA_DIR, "
        f"DATA_DIR/raw or DATA_DIR/{folder}/raw"
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw, detected from its first bytes).

    Raises:
        ValueError: the file is not valid gzip, has a bad magic number, or its payload size
            differs from what the header's dimensions say (truncated or padded).
    """
    path = Path(path)
    return _parse_idx(path, _idx_bytes(path))


def _idx_bytes(path: Path) -> bytes:
    """The file's IDX bytes (decompressed when gzip)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: damaged gzip file ({exc})") from None
    return raw


def check_published(raw: bytes, path: Path, name: str, stem: str) -> None:
    """Refuse a file that is another published file (the other data set's, or another split's);
    warn about one that matches no published file."""
    known = PUBLISHED.get(hashlib.sha256(raw).hexdigest())
    if known is None:
        warnings.warn(f"regrow: {path} is not the published {TITLES[name]} {stem} (its SHA-256 matches no "
                      "published file); training on it as it is", UserWarning, stacklevel=5)
    elif known[0] != name:
        raise ValueError(f"{path.parent}: these files are {TITLES[known[0]]}, not {TITLES[name]} ({path.name} is "
                         f"the published {TITLES[known[0]]} {known[1]}); use --dataset {known[0]} or point "
                         f"--data-dir at the {TITLES[name]} files")
    elif known[1] != stem:
        raise ValueError(f"{path} is the published {TITLES[name]} {known[1]}, not {stem}")


def _parse_idx(path: Path, raw: bytes) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    payload = len(raw) - header
    if payload != expected:
        state = "truncated" if payload < expected else "longer than its header says"
        raise ValueError(f"{path}: {state}: dims {dims} need {expected} data bytes, found {payload}")
    # copy: frombuffer over bytes is read-only, and torch wants writable memory
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def find_file(data_dir: Path, stem: str, name: str) -> Path:
    """Locate ``stem`` (raw preferred over ``stem.gz``) in the accepted folders of ``name``."""
    folder = MNIST_LIKE[name][0]
    dirs = (data_dir, data_dir / "raw", data_dir / folder / "raw")
    for d in dirs:
        for candidate in (d / stem, d / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{stem}(.gz) not found under {data_dir}; {layout(name)}")


def _read_pair(data_dir: Path, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = []
    for stem in _FILES[split]:
        path = find_file(data_dir, stem, name)
        raw = _idx_bytes(path)
        check_published(raw, path, name, stem)
        arrays.append((path, _parse_idx(path, raw)))
    (images_path, images), (labels_path, labels) = arrays
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected unsigned-byte images [N, H, W] (magic 2051), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{labels_path}: expected unsigned-byte labels [N] (magic 2049), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise ValueError(f"{labels_path}: label {int(labels.max())} out of range 0..9")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_mnist_like(name: str, data_dir: Path) -> tuple[ArrayDataset, ArrayDataset]:
    """Train and test sets of ``name`` ("mnist" or "fashion-mnist") as published (60000/10000)."""
    _, mean, std = MNIST_LIKE[name]
    out = []
    for split in ("train", "test"):
        x, y = _read_pair(data_dir, name, split)
        out.append(ArrayDataset(x, y, scale=1 / 255, mean=(mean,), std=(std,)))
    return out[0], out[1]
