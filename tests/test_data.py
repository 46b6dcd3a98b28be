"""Tests for regrow.data: built-in sets, IDX and CIFAR loaders, validation split, augmentation."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from regrow.data import DATASETS, ArrayDataset, load, read_idx
from regrow.data.cifar import load_pickle

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def all_of(ds: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return ds.get_batch(torch.arange(len(ds)))


# ----------------------------------------------------------------------------- built-in sets


def test_digits_shapes_and_split() -> None:
    s = load("digits")
    assert (s.name, s.in_shape, s.num_classes, s.val) == ("digits", (1, 8, 8), 10, None)
    assert (len(s.train), len(s.test)) == (1437, 360)
    x, y = all_of(s.train)
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3  # standardised on train
    # stratified: every class has 35-37 of the 360 test images
    counts = torch.bincount(s.test.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_builtin_test_split_is_fixed_across_seeds() -> None:
    a, b = load("digits", seed=0), load("digits", seed=5)
    assert torch.equal(a.test.data, b.test.data) and torch.equal(a.test.targets, b.test.targets)
    assert torch.equal(a.train.data, b.train.data)


def test_synthetic_is_learnable_and_fixed() -> None:
    s = load("synthetic")
    assert (s.in_shape, s.num_classes, len(s.train), len(s.test)) == ((1, 8, 8), 10, 2000, 500)
    x, y = all_of(s.train)
    xt, yt = all_of(s.test)
    # nearest class mean: two clusters per class make it weak, but far above chance (0.1)
    centroids = torch.stack([x[y == k].flatten(1).mean(0) for k in range(10)])
    acc = (torch.cdist(xt.flatten(1), centroids).argmin(1) == yt).float().mean().item()
    assert 0.25 < acc < 0.9
    assert torch.equal(load("synthetic").train.data, s.train.data)


def test_unknown_dataset_and_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*digits.*cifar100"):
        load("imagenet")
    with pytest.raises(ValueError, match="augmentation is defined for cifar10, cifar100 only"):
        load("digits", augment=True)
    with pytest.raises(ValueError, match="pass data_dir"):
        load("mnist")
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        load("digits", val_fraction=1.0)
    assert set(DATASETS) == {"digits", "synthetic", "mnist", "fashion-mnist", "cifar10", "cifar100"}


# ----------------------------------------------------------------------------- validation split


def _row_multiset(data: torch.Tensor) -> list[bytes]:
    return sorted(row.numpy().tobytes() for row in data.flatten(1))


def test_validation_split_partitions_train() -> None:
    full = load("digits")
    s = load("digits", val_fraction=0.2, seed=1)
    assert s.val is not None and (len(s.train), len(s.val)) == (1150, 287)
    merged = torch.cat([s.train.data, s.val.data])
    assert _row_multiset(merged) == _row_multiset(full.train.data)
    assert torch.equal(torch.cat([s.train.targets, s.val.targets]).sort().values, full.train.targets.sort().values)
    assert torch.equal(s.test.data, full.test.data)


def test_validation_split_is_seeded() -> None:
    a = load("digits", val_fraction=0.2, seed=1)
    b = load("digits", val_fraction=0.2, seed=1)
    c = load("digits", val_fraction=0.2, seed=2)
    assert torch.equal(a.val.data, b.val.data)
    assert not torch.equal(a.val.data, c.val.data)


# ----------------------------------------------------------------------------- IDX files

_CODES = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype("int16"): 0x0B, np.dtype("int32"): 0x0C,
          np.dtype("float32"): 0x0D, np.dtype("float64"): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, _CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(folder: Path, gz: bool, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(folder / name, arr, gz)
    return arrays


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(sorted(_CODES, key=str)),
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_read_idx_roundtrip(dtype: np.dtype, shape: list[int], gz: bool, seed: int) -> None:
    arr = np.asarray(np.random.default_rng(seed).normal(size=shape) * 100).astype(dtype)
    with tempfile.TemporaryDirectory() as d:
        out = read_idx(write_idx(Path(d) / "a-idx-ubyte", arr, gz))
    assert out.shape == arr.shape and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize(
    "name,subdir", [("mnist", ""), ("mnist", "raw"), ("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw")]
)
def test_idx_loader_layouts(tmp_path: Path, name: str, subdir: str, gz: bool) -> None:
    arrays = write_mnist(tmp_path / subdir, gz)
    s = load(name, tmp_path)
    assert (s.in_shape, s.num_classes, len(s.train), len(s.test)) == ((1, 28, 28), 10, 12, 5)
    assert torch.equal(s.train.data[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(s.test.targets, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    x, y = s.train[3]
    mean, std = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}[name]
    expected = (torch.from_numpy(arrays["train-images-idx3-ubyte"][3]).float() / 255 - mean) / std
    torch.testing.assert_close(x[0], expected)
    assert y.item() == arrays["train-labels-idx1-ubyte"][3]


def test_idx_missing_file_names_it_and_the_layout(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\(\.gz\) not found.*DATA_DIR/MNIST/raw"):
        load("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load("mnist", tmp_path / "nowhere")


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_truncated_file(tmp_path: Path, gz: bool) -> None:
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    data = path.read_bytes()[:-100]
    if gz:
        path.unlink()
        path = tmp_path / "train-images-idx3-ubyte.gz"
        data = gzip.compress(data)
    path.write_bytes(data)
    expected = rf"{path.name}: truncated: dims \(12, 28, 28\) need 9408 data bytes, found 9308"
    with pytest.raises(ValueError, match=expected):
        load("mnist", tmp_path)


def test_idx_damaged_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])  # cut inside the deflate stream
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: damaged gzip file"):
        load("mnist", tmp_path)


def test_idx_bad_magic_and_extra_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x-idx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="x-idx: not an IDX file"):
        read_idx(path)
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"\0")
    with pytest.raises(ValueError, match="longer than its header says"):
        read_idx(path)


def test_idx_inconsistent_files(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8), gz=False)
    with pytest.raises(ValueError, match="has 12 images but .*train-labels-idx1-ubyte has 11 labels"):
        load("mnist", tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(12, 10, np.uint8), gz=False)
    with pytest.raises(ValueError, match="label 10 out of range"):
        load("mnist", tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((12, 28, 28), np.uint8), gz=False)
    with pytest.raises(ValueError, match=r"expected unsigned-byte labels \[N\] \(magic 2049\)"):
        load("mnist", tmp_path)


# ----------------------------------------------------------------------------- CIFAR pickles

CIFAR_SPEC = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                b"labels", b"label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names", 100),
}


def write_cifar(root: Path, name: str, n: int = 6, protocol: int = 2, seed: int = 0) -> dict[str, dict]:
    """Files in the real layout: dicts with bytes keys, uint8 data rows of 3072, label lists."""
    folder, train, test, meta, label_key, names_key, k = CIFAR_SPEC[name]
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True)
    batches = {}
    for i, f in enumerate(train + test):
        labels = [int(v) for v in rng.integers(0, k, n)]
        labels[0] = k - 1 if i == 0 else labels[0]
        batch = {b"batch_label": f.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: labels, b"filenames": [b"img%d.png" % j for j in range(n)]}
        if name == "cifar100":
            batch[b"coarse_labels"] = [v // 5 for v in labels]
        with open(root / folder / f, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
        batches[f] = batch
    with open(root / folder / meta, "wb") as fh:
        pickle.dump({names_key: [b"class%d" % j for j in range(k)]}, fh, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader(tmp_path: Path, name: str, protocol: int) -> None:
    batches = write_cifar(tmp_path, name, protocol=protocol)
    folder, train, test, _, label_key, _, k = CIFAR_SPEC[name]
    for data_dir in (tmp_path, tmp_path / folder):  # the folder or its parent
        s = load(name, data_dir, augment=False)
        assert (s.in_shape, s.num_classes, len(s.train), len(s.test)) == ((3, 32, 32), k, 6 * len(train), 6)
        assert s.classes == tuple(f"class{j}" for j in range(k))
        expected = np.concatenate([batches[f][b"data"] for f in train]).reshape(-1, 3, 32, 32)
        assert torch.equal(s.train.data, torch.from_numpy(expected))
        assert s.train.targets.tolist() == sum((batches[f][label_key] for f in train), [])
    # row layout: the first 1024 values are the red plane, row-major
    x, _ = s.test[2]
    raw = batches[test[0]][b"data"][2]
    mean, std = (0.4914, 0.2470) if name == "cifar10" else (0.5071, 0.2673)
    assert x[0, 0, 5].item() == pytest.approx((raw[5] / 255 - mean) / std, abs=1e-5)
    assert x[0, 1, 0].item() == pytest.approx((raw[32] / 255 - mean) / std, abs=1e-5)


def test_cifar_missing_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 not found; cifar10 expects DATA_DIR to be the cifar"):
        load("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="train not found in .*cifar100 expects DATA_DIR to be the cifar-100-p"):
        load("cifar100", tmp_path)


def test_cifar_damaged_pickle(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="test_batch: damaged or not a CIFAR python pickle"):
        load("cifar10", tmp_path)


def test_cifar_byte_flipped_pickles_raise_value_error(tmp_path: Path) -> None:
    """Damage in a pickle's opcodes raises anything (LookupError via _codecs, OverflowError,
    MemoryError from absurd lengths ...): the loader must turn all of it into one ValueError."""
    rng = np.random.default_rng(0)
    batch = {b"batch_label": b"training batch 1 of 5", b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
             b"labels": [1, 2], b"filenames": [b"a.png", b"b.png"]}
    originals = [pickle.dumps(batch, protocol=2), pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)]
    flipped = [originals[0].replace(b"latin1", b"lqtin1", 1),    # a mangled codec name
               originals[0].replace(b"latin1", b"utf-16", 1)]    # a real codec, but not one bytes use
    gen = random.Random(1234)
    for trial in range(200):
        raw = bytearray(originals[trial % 2])
        for _ in range(gen.randint(1, 3)):
            raw[gen.randrange(160)] = gen.randrange(256)          # the opcodes, not the pixel bytes
        flipped.append(bytes(raw))
    path = tmp_path / "data_batch_1"
    kinds = set()
    for raw in flipped:
        path.write_bytes(raw)
        try:
            d = load_pickle(path)
        except ValueError as err:
            msg = str(err)
            assert str(path) in msg and "expected a pickled dict" in msg and "\n" not in msg
            kinds.add(msg.split("pickle (", 1)[-1].split(":", 1)[0])
        else:
            assert isinstance(d, dict)
    # the seeded flips reach the error types that used to escape as they were
    assert {"UnpicklingError", "MemoryError", "OverflowError"} <= kinds
    with pytest.raises(ValueError, match="refusing _codecs.encode with encoding 'lqtin1'"):
        path.write_bytes(flipped[0])
        load_pickle(path)


def test_cifar_wrong_content(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="data_batch_2: 'data' must be uint8 rows of 3072"):
        load("cifar10", tmp_path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(ValueError, match=r"data_batch_2: labels outside 0..9"):
        load("cifar10", tmp_path)


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil(str(marker))}))
    with pytest.raises(ValueError, match=r"data_batch_1: .*refusing to load global io\.open"):
        load("cifar10", tmp_path)
    assert not marker.exists()
    # the payload is live: a plain unpickler would have created the file
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Evil(str(live)))).close()
    assert live.exists()


# ----------------------------------------------------------------------------- augmentation


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    write_cifar(tmp_path, "cifar10", n=8)
    return tmp_path


def _crops(img: torch.Tensor, fill: torch.Tensor, p: int = 4) -> list[torch.Tensor]:
    c, h, w = img.shape
    padded = fill.view(c, 1, 1).repeat(1, h + 2 * p, w + 2 * p)
    padded[:, p : p + h, p : p + w] = img
    out = []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(-1)]
    return out


def test_augmentation_is_crop_and_flip_of_the_image(cifar_dir: Path) -> None:
    aug, plain = load("cifar10", cifar_dir), load("cifar10", cifar_dir, augment=False)
    assert aug.train.augment is not None and aug.test.augment is None
    xa, ya = all_of(aug.train)
    xp, yp = all_of(plain.train)
    assert xa.shape == xp.shape == (40, 3, 32, 32) and torch.equal(ya, yp)
    fill = (-torch.tensor([0.4914, 0.4822, 0.4465]) / torch.tensor([0.2470, 0.2435, 0.2616]))
    for i in range(0, 40, 7):
        assert any(torch.equal(xa[i], c) for c in _crops(xp[i], fill)), i
    assert not torch.equal(xa, xp)
    assert torch.equal(all_of(aug.test)[0], all_of(plain.test)[0])


def test_augmentation_is_seeded_and_varies_by_epoch(cifar_dir: Path) -> None:
    a, b, c = (load("cifar10", cifar_dir, seed=s).train for s in (1, 1, 2))
    assert torch.equal(all_of(a)[0], all_of(b)[0])
    assert not torch.equal(all_of(a)[0], all_of(c)[0])
    e0 = all_of(a)[0]
    a.set_epoch(1)
    assert not torch.equal(e0, all_of(a)[0])
    a.set_epoch(0)
    assert torch.equal(e0, all_of(a)[0])  # stateless: revisiting an epoch repeats it (resume-safe)


def test_augmentation_independent_of_batch_order(cifar_dir: Path) -> None:
    ds = load("cifar10", cifar_dir, seed=3).train
    ds.set_epoch(4)
    x_all, _ = all_of(ds)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    x_perm, _ = ds.get_batch(perm)
    assert torch.equal(x_perm, x_all[perm])
    assert torch.equal(ds[5][0], x_all[5])
    x_loader = torch.cat([xb for xb, _ in DataLoader(ds, batch_size=16)])
    assert torch.equal(x_loader, x_all)


def test_validation_split_is_not_augmented(cifar_dir: Path) -> None:
    s = load("cifar10", cifar_dir, val_fraction=0.25, seed=0)
    assert s.val is not None and s.val.augment is None and s.train.augment is not None
    assert (len(s.train), len(s.val)) == (30, 10)


# ----------------------------------------------------------------------------- real files


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_mnist_like(name: str) -> None:
    folder = REAL_DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    s = load(name, folder)
    assert (len(s.train), len(s.test), s.in_shape, s.num_classes) == (60000, 10000, (1, 28, 28), 10)
    train_counts = torch.bincount(s.train.targets, minlength=10).tolist()
    if name == "fashion-mnist":
        assert train_counts == [6000] * 10
    else:
        assert train_counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    x, _ = s.train.get_batch(torch.arange(0, 60000, 10))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05  # the standard constants fit
