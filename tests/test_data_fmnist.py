"""Atomic writes, the IDX reader, Fashion-MNIST discovery/loading and the array-dataset format."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from data_tools.convert import convert_dataset, convert_fashion_mnist
from paws_cli.data.datasets import fmnist
from paws_cli.data.datasets.arrays import (
    ArrayDataset,
    channel_stats,
    is_array_dataset,
    load_array_dataset,
    resolve_fmnist,
    write_array_dataset,
)
from paws_cli.data.datasets.fmnist import CLASS_NAMES, find_fashion_mnist, load_fashion_mnist, read_idx
from paws_cli.io_utils import _current_umask, atomic_path, atomic_write_bytes, atomic_write_text

# Independent writer: type code and big-endian format character per numpy dtype.
_CODES = {np.dtype(np.uint8): (0x08, "B"), np.dtype(np.int16): (0x0B, "h"), np.dtype(np.int32): (0x0C, "i"),
          np.dtype(np.float32): (0x0D, "f"), np.dtype(np.float64): (0x0E, "d")}  # fmt: skip


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` as IDX with struct, element by element (deliberately not numpy's byte swapping)."""
    code, fmt = _CODES[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + struct.pack(f">{arr.size}{fmt}", *arr.reshape(-1).tolist())


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def fake_fmnist_root(root: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> Path:
    """Four IDX files in Fashion-MNIST layout with seeded random pixels and cyclic labels."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        sfx = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", labels, gz)
    return root


ABC = ["a", "b", "c"]


def small_dataset(n_train: int = 30, n_test: int = 12, channels: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (8, 6) if channels is None else (8, 6, channels)
    train = (rng.integers(0, 256, (n_train, *shape), dtype=np.uint8), np.arange(n_train) % 3)
    test = (rng.integers(0, 256, (n_test, *shape), dtype=np.uint8), np.arange(n_test) % 3)
    return train, test


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_content(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    # Not mkstemp's private 0600: the permissions an ordinary open() would give.
    assert target.stat().st_mode & 0o777 == 0o666 & ~_current_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_atomic_path_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.npy"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match=r"boom"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and tmp.suffix == ".npy"
        tmp.write_bytes(b"half-written")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npy"]


def test_atomic_path_np_save_lands_on_target(tmp_path):
    target = tmp_path / "a.npy"
    with atomic_path(target) as tmp:
        np.save(tmp, np.arange(5))
    np.testing.assert_array_equal(np.load(target), np.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_atomic_path_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        atomic_write_text(tmp_path / "nope" / "f.txt", "x")


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([7, 0, 255, 3], dtype=np.uint8),
        np.array([[-5, 300], [70000, -(2**31)]], dtype=np.int32),
        np.array([[-1, 2], [32767, -32768]], dtype=np.int16),
        np.array([0.5, -1.25, 3e9], dtype=np.float32),
        np.array([[1e-300, -2.5]], dtype=np.float64),
    ],
)
def test_idx_round_trip(tmp_path, arr, gz):
    path = write_idx(tmp_path / "x.idx", arr, gz)
    back = read_idx(path)
    assert back.shape == arr.shape
    assert back.dtype == arr.dtype and back.dtype.isnative
    np.testing.assert_array_equal(back, arr)


def test_idx_header_bytes_match_mnist_layout(tmp_path):
    # Hand-built file: magic 0x00000801 (uint8, 1-D), count 3, then the bytes.
    path = tmp_path / "labels"
    path.write_bytes(bytes.fromhex("00000801") + (3).to_bytes(4, "big") + bytes([9, 0, 4]))
    np.testing.assert_array_equal(read_idx(path), [9, 0, 4])


def test_idx_truncated_data(tmp_path):
    data = idx_bytes(np.zeros((4, 5, 5), dtype=np.uint8))
    path = tmp_path / "cut-images"
    path.write_bytes(data[:-7])
    with pytest.raises(ValueError, match=r"cut-images is truncated.*needs 100 data bytes, found 93"):
        read_idx(path)
    path.write_bytes(data[:10])
    with pytest.raises(ValueError, match=r"truncated inside its header"):
        read_idx(path)
    path.write_bytes(data[:2])
    with pytest.raises(ValueError, match=r"too short"):
        read_idx(path)


def test_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)) + b"\x00\x00")
    with pytest.raises(ValueError, match=r"2 unexpected trailing bytes"):
        read_idx(path)


def test_idx_bad_magic_and_type(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(ValueError, match=r"bad magic"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x07\x01" + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(ValueError, match=r"unknown data type code 0x07"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x00")
    with pytest.raises(ValueError, match=r"0 dimensions"):
        read_idx(path)


def test_idx_corrupt_gzip(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path = tmp_path / "x.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"x\.gz is a corrupt or truncated gzip"):
        read_idx(path)
    path.write_bytes(blob[:10] + bytes(b ^ 0xFF for b in blob[10:]))
    with pytest.raises(ValueError, match=r"corrupt or truncated gzip"):
        read_idx(path)


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing.idx"):
        read_idx(tmp_path / "nothing.idx")


# --------------------------------------------------------------------------- Fashion-MNIST files


def test_find_with_root_lists_missing_files(tmp_path):
    root = fake_fmnist_root(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    (root / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        find_fashion_mnist(root)
    msg = str(err.value)
    assert "missing 2 of the 4" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(FileNotFoundError, match=r"not a directory"):
        find_fashion_mnist(tmp_path / "absent")


def test_find_default_missing_explains_install(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist, "DEFAULT_ROOT", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError) as err:
        find_fashion_mnist(None)
    msg = str(err.value)
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "apt-get download dataset-fashion-mnist" in msg and "dpkg-deb -x" in msg
    assert "data.root=DIR/usr/share/datasets/fashion-mnist" in msg


@pytest.mark.parametrize("gz", [True, False])
def test_load_fake_fashion_mnist(tmp_path, gz):
    root = fake_fmnist_root(tmp_path / "fm", gz=gz)
    data = load_fashion_mnist(root)
    images, labels = data["train"]
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, np.arange(40) % 10)
    assert data["test"][0].shape == (20, 28, 28)
    assert len(CLASS_NAMES) == 10


def test_load_rejects_mismatched_counts_and_labels(tmp_path):
    root = fake_fmnist_root(tmp_path / "fm")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(39, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"40 images but .* 39 labels"):
        load_fashion_mnist(root)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.full(40, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"label 10"):
        load_fashion_mnist(root)
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((40, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \(N, 28, 28\)"):
        load_fashion_mnist(root)


# --------------------------------------------------------------------------- array datasets


def test_channel_stats_match_float64(tmp_path):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (50, 7, 5), dtype=np.uint8)
    rgb = rng.integers(0, 256, (50, 7, 5, 3), dtype=np.uint8)
    mean, std = channel_stats(gray)
    x = gray.astype(np.float64) / 255.0
    assert mean == pytest.approx([x.mean()], abs=1e-12) and std == pytest.approx([x.std()], abs=1e-12)
    mean, std = channel_stats(rgb)
    y = rgb.astype(np.float64).reshape(-1, 3) / 255.0
    assert mean == pytest.approx(y.mean(0).tolist(), abs=1e-12)
    assert std == pytest.approx(y.std(0).tolist(), abs=1e-12)
    # Hand case: pixels {0, 255} half each -> mean 0.5, std 0.5.
    mean, std = channel_stats(np.array([[[0, 255]]], dtype=np.uint8))
    assert mean == [0.5] and std == [0.5]


@pytest.mark.parametrize("channels", [None, 3])
def test_array_round_trip(tmp_path, channels):
    train, test = small_dataset(channels=channels)
    meta = write_array_dataset(tmp_path / "ds", "toy", train, test, ["a", "b", "c"], source="unit-test")
    ds = load_array_dataset(tmp_path / "ds", verify_hash=True)
    assert isinstance(ds, ArrayDataset)
    assert ds.name == "toy" and ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    np.testing.assert_array_equal(ds.train_images, train[0])
    np.testing.assert_array_equal(ds.train_labels, train[1])
    np.testing.assert_array_equal(ds.split("test")[0], test[0])
    np.testing.assert_array_equal(ds.test_labels, test[1])
    assert ds.train_labels.dtype == np.int64
    assert ds.image_shape == train[0].shape[1:]
    x = train[0].astype(np.float64).reshape(len(train[0]), -1, channels or 1) / 255.0
    assert ds.mean == pytest.approx(x.mean((0, 1)).tolist()) and ds.std == pytest.approx(
        x.std((0, 1)).tolist()
    )
    on_disk = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert on_disk == meta
    assert on_disk["format"] == "paws-array-dataset" and on_disk["version"] == 1
    assert on_disk["counts"] == {"train": 30, "test": 12} and on_disk["source"] == "unit-test"
    assert set(on_disk["sha256"]) == {
        "train_images.npy",
        "train_labels.npy",
        "test_images.npy",
        "test_labels.npy",
    }
    assert is_array_dataset(tmp_path / "ds") and not is_array_dataset(tmp_path)
    with pytest.raises(KeyError, match=r"unknown split 'val'"):
        ds.split("val")


def test_write_rejects_bad_inputs(tmp_path):
    train, test = small_dataset()
    with pytest.raises(ValueError, match=r"train labels span \[0, 2\] but there are 2 class names"):
        write_array_dataset(tmp_path / "a", "t", train, test, ["a", "b"], source="s")
    with pytest.raises(ValueError, match=r"30 images but 29 labels"):
        write_array_dataset(tmp_path / "a", "t", (train[0], train[1][:-1]), test, ABC, source="s")
    with pytest.raises(ValueError, match=r"must be uint8"):
        write_array_dataset(
            tmp_path / "a", "t", (train[0].astype(np.float32), train[1]), test, ABC, source="s"
        )
    with pytest.raises(ValueError, match=r"must match"):
        write_array_dataset(tmp_path / "a", "t", train, (test[0][:, :4], test[1]), ABC, source="s")
    with pytest.raises(TypeError, match=r"list of names"):
        write_array_dataset(tmp_path / "a", "t", train, test, "abc", source="s")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes.txt"):
        write_array_dataset(tmp_path / "busy", "t", train, test, ABC, source="s")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*paws convert-dataset fashion-mnist OUT"):
        load_array_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a converted array dataset.*paws convert-dataset"):
        load_array_dataset(tmp_path / "empty")
    train, test = small_dataset()
    root = tmp_path / "ds"
    write_array_dataset(root, "toy", train, test, ABC, source="s")
    meta = json.loads((root / "meta.json").read_text())

    (root / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"did not finish"):
        load_array_dataset(root)

    (root / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match=r"version 99"):
        load_array_dataset(root)
    (root / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"not valid JSON"):
        load_array_dataset(root)
    (root / "meta.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(ValueError, match=r"format 'other'"):
        load_array_dataset(root)

    (root / "meta.json").write_text(json.dumps({**meta, "counts": {"train": 31, "test": 12}}))
    with pytest.raises(ValueError, match=r"30 images, 30 labels, meta.json count 31"):
        load_array_dataset(root)
    (root / "meta.json").write_text(json.dumps({**meta, "image_shape": [6, 8]}))
    with pytest.raises(ValueError, match=r"train_images.npy holds uint8 \(30, 8, 6\)"):
        load_array_dataset(root)
    (root / "meta.json").write_text(json.dumps({**meta, "class_names": ["a", "b"]}))
    with pytest.raises(ValueError, match=r"train_labels.npy has labels in \[0, 2\] but the dataset has 2"):
        load_array_dataset(root)

    (root / "meta.json").write_text(json.dumps(meta))
    np.save(root / "test_labels.npy", np.roll(test[1], 1))  # same range and dtype, other content
    load_array_dataset(root)  # structure alone is fine ...
    with pytest.raises(ValueError, match=r"test_labels.npy has sha256"):
        load_array_dataset(root, verify_hash=True)  # ... but the hash sees the change
    (root / "test_images.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks test_images.npy"):
        load_array_dataset(root)


def test_resolve_converts_once_and_reuses(tmp_path):
    src = fake_fmnist_root(tmp_path / "fm")
    cache = tmp_path / "cache"
    out = resolve_fmnist(None, src, cache)
    assert out == cache / "fashion-mnist"
    ds = load_array_dataset(out, verify_hash=True)
    raw = load_fashion_mnist(src)
    np.testing.assert_array_equal(ds.train_images, raw["train"][0])
    np.testing.assert_array_equal(ds.test_labels, raw["test"][1])
    assert ds.class_names == list(CLASS_NAMES) and ds.meta["source"] == str(src.resolve())
    stamp = (out / "train_images.npy").stat().st_mtime_ns
    assert resolve_fmnist(None, src, cache) == out
    assert (out / "train_images.npy").stat().st_mtime_ns == stamp  # reused, not rewritten
    # A broken cache (meta lost mid-write) is rebuilt.
    (out / "meta.json").unlink()
    assert is_array_dataset(resolve_fmnist(None, src, cache))
    # An explicit dataset_dir is used as is, and must be a converted dataset.
    assert resolve_fmnist(out, None, tmp_path / "unused") == out
    assert not (tmp_path / "unused").exists()
    with pytest.raises(FileNotFoundError, match=r"not a converted array dataset"):
        resolve_fmnist(tmp_path, None, cache)


def test_convert_entry_points(tmp_path):
    src = fake_fmnist_root(tmp_path / "fm", n_train=20, n_test=10)
    out = convert_fashion_mnist(tmp_path / "out", root=src)
    assert out == tmp_path / "out" and load_array_dataset(out).meta["counts"] == {"train": 20, "test": 10}
    assert convert_dataset("Fashion-MNIST", tmp_path / "out2", src) == tmp_path / "out2"
    with pytest.raises(ValueError, match=r"cannot convert dataset 'cifar10'.*fashion-mnist"):
        convert_dataset("cifar10", tmp_path / "out3")


# --------------------------------------------------------------------------- the real dataset


def _real_root() -> Path:
    try:
        return find_fashion_mnist(None)
    except FileNotFoundError:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")


def test_real_fashion_mnist(tmp_path):
    root = _real_root()
    data = load_fashion_mnist(root)
    assert data["train"][0].shape == (60000, 28, 28) and data["train"][1].shape == (60000,)
    assert data["test"][0].shape == (10000, 28, 28) and data["test"][1].shape == (10000,)
    np.testing.assert_array_equal(np.bincount(data["train"][1]), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(data["test"][1]), [1000] * 10)
    out = convert_fashion_mnist(tmp_path / "fm")
    ds = load_array_dataset(out, verify_hash=True)
    assert round(ds.mean[0], 3) == pytest.approx(0.286) and round(ds.std[0], 3) == pytest.approx(0.353)
    # Independent float64 check on a slice of 6000 images.
    part = ds.train_images[:6000].astype(np.float64) / 255.0
    assert abs(part.mean() - 0.286) < 0.01
