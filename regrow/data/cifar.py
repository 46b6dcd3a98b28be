"""CIFAR-10 and CIFAR-100 from the "python version" pickle files, unpickled safely."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ArrayDataset

# Per-channel mean and std of the training images in [0, 1]. (The 0.2023/0.1994/0.2010
# often quoted for CIFAR-10 are not its std; these are.)
CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
        "num_classes": 10,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ("train",),
        "test": ("test",),
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
        "num_classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}


_LATIN1_NAMES = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "iso_8859_1", "l1"}


def _latin1_encode(text: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    """``_codecs.encode`` as pickles of bytes use it (latin-1, the byte-preserving codec), and
    nothing else: a damaged name must not reach the codec registry's lookup."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1_NAMES:
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR pickle may name: what numpy needs to rebuild an array."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
        from numpy._core.numeric import _frombuffer
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"): _latin1_encode,
    }
    # numpy 1.x pickles name numpy.core, 2.x numpy._core; protocol 5 uses _frombuffer
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    return allowed


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy array reconstruction."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


_PICKLE_LAYOUT = "a pickled dict of the python version (b'data': uint8 [N, 3072], labels: N ints)"


def load_pickle(path: Path) -> dict[str, Any]:
    """Unpickle a CIFAR file (``encoding='bytes'``, plain data only) into a dict with str keys.

    Raises:
        ValueError: the file is damaged or not a CIFAR pickle (naming the file and the layout).
    """
    data = path.read_bytes()   # OSError (unreadable file) is not "damaged": left as it is
    try:
        obj = _PlainDataUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:   # noqa: BLE001 - damaged pickles raise a zoo of types (LookupError,
        # OverflowError, MemoryError, SystemError, numpy's own ...): all mean "not readable"
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(f"{path}: damaged or not a CIFAR python pickle ({type(exc).__name__}: {detail}); "
                         f"expected {_PICKLE_LAYOUT}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected {_PICKLE_LAYOUT}, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def layout(name: str) -> str:
    """Human description of the expected folder layout for ``name``."""
    spec = CIFAR[name]
    files = ", ".join(spec["train"] + spec["test"])
    return (
        f"{name} expects DATA_DIR to be the {spec['folder']} folder of the python version "
        f"(files {files}, optional {spec['meta']}) or the folder that contains it"
    )


def find_folder(name: str, data_dir: Path) -> Path:
    """The folder holding the batch files: ``data_dir`` itself or ``data_dir/<folder>``."""
    spec = CIFAR[name]
    first = spec["train"][0]
    for d in (data_dir, data_dir / spec["folder"]):
        if (d / first).is_file():
            return d
    raise FileNotFoundError(f"{first} not found in {data_dir} or {data_dir / spec['folder']}; {layout(name)}")


def _read_batch(path: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    spec = CIFAR[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {layout(name)}")
    d = load_pickle(path)
    if "data" not in d or spec["labels"] not in d:
        raise ValueError(f"{path}: missing key 'data' or {spec['labels']!r} (keys: {sorted(d)})")
    data = d["data"]
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data)
    if data.dtype != np.uint8 or data.size % 3072:
        raise ValueError(f"{path}: 'data' must be uint8 rows of 3072 values, got {data.dtype} {data.shape}")
    images = data.reshape(-1, 3, 32, 32).copy()  # rows are R, G, B planes of 32x32; copy: writable
    try:
        labels = np.asarray(d[spec["labels"]], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{path}: {spec['labels']!r} must be a list of integers") from None
    if labels.shape != (len(images),):
        raise ValueError(f"{path}: {len(images)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
        raise ValueError(f"{path}: labels outside 0..{spec['num_classes'] - 1}")
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_cifar(name: str, data_dir: Path) -> tuple[ArrayDataset, ArrayDataset, tuple[str, ...] | None]:
    """Train and test sets of ``name`` ("cifar10" or "cifar100"), plus class names if the meta file exists."""
    spec = CIFAR[name]
    folder = find_folder(name, data_dir)
    splits = []
    for split in ("train", "test"):
        parts = [_read_batch(folder / f, name) for f in spec[split]]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        splits.append(ArrayDataset(x, y, scale=1 / 255, mean=spec["mean"], std=spec["std"]))
    classes = None
    meta = folder / spec["meta"]
    if meta.is_file():
        names = load_pickle(meta).get(spec["names"])
        if names is not None:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
            if len(classes) != spec["num_classes"]:
                raise ValueError(f"{meta}: {len(classes)} class names, expected {spec['num_classes']}")
    return splits[0], splits[1], classes
