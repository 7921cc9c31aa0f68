"""The toolkit's on-disk "array dataset": a directory of ``.npy`` arrays plus a ``meta.json``.

Layout::

    train_images.npy  (N, H, W) or (N, H, W, C) uint8
    train_labels.npy  (N,) int64
    test_images.npy, test_labels.npy
    meta.json         format, version, name, class names, counts, image shape, channel mean/std of the
                      train images in [0, 1], source, sha256 of every array file, and optionally
                      ``conversion`` (how it was made: sizes, channels, where the test split came from)

Every file is written atomically and ``meta.json`` last, so a directory without it is an unfinished write.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from paws_cli.data.datasets.fmnist import CLASS_NAMES, find_fashion_mnist, load_fashion_mnist
from paws_cli.io_utils import atomic_path, atomic_write_text

FORMAT_NAME = "paws-array-dataset"
FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "test")
ARRAY_FILES = tuple(f"{split}_{part}.npy" for split in SPLITS for part in ("images", "labels"))
FMNIST_NAME = "fashion-mnist"

_HOW_TO_MAKE = (
    "make one with `paws convert-dataset images SRC OUT` (SRC: one sub-folder of images per class), "
    "`paws convert-dataset arrays FILE.npz OUT` (x_train, y_train[, x_test, y_test]) or "
    "`paws convert-dataset fashion-mnist OUT`"
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and (population) std of uint8 images scaled to [0, 1].

    Uses a 256-bin histogram per channel and integer arithmetic, so it needs no float copy of the data.
    """
    num_channels = 1 if images.ndim == 3 else images.shape[-1]
    flat = images.reshape(-1, num_channels)
    values = np.arange(256, dtype=np.int64)
    means, stds = [], []
    for c in range(num_channels):
        counts = np.zeros(256, dtype=np.int64)
        # Chunked, because bincount widens its input to intp (8x the uint8 size).
        for start in range(0, len(flat), 1 << 22):
            counts += np.bincount(flat[start : start + (1 << 22), c], minlength=256)
        n = int(counts.sum())
        s1 = int((counts * values).sum())
        s2 = int((counts * values * values).sum())
        # n*s2 - s1^2 in Python integers is exact; the variance is that over n^2 (and 255^2 for [0, 1]).
        means.append(s1 / n / 255.0)
        stds.append(math.sqrt((n * s2 - s1 * s1) / (n * n)) / 255.0)
    return means, stds


def _check_split(split: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"{split} images must be uint8 (N,H,W) or (N,H,W,C), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{split} labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{split} has {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"{split} split is empty")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{split} labels span [{lo}, {hi}] but there are {num_classes} class names")


def write_array_dataset(
    out_dir: str | os.PathLike[str],
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    class_names: Sequence[str],
    source: str,
    conversion: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an array dataset into ``out_dir`` (created if needed) and return its meta dict.

    ``conversion`` (JSON-serialisable) is recorded as meta.json's ``conversion`` entry."""
    out = Path(out_dir)
    if isinstance(class_names, str):
        raise TypeError(f"class_names must be a list of names, not the string {class_names!r}")
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise ValueError("class_names is empty")
    arrays = {
        "train": (np.asarray(train[0]), np.asarray(train[1])),
        "test": (np.asarray(test[0]), np.asarray(test[1])),
    }
    for split, (images, labels) in arrays.items():
        _check_split(split, images, labels, len(class_names))
    if arrays["train"][0].shape[1:] != arrays["test"][0].shape[1:]:
        raise ValueError(
            f"train images are {arrays['train'][0].shape[1:]} but "
            f"test images are {arrays['test'][0].shape[1:]}; they must match"
        )
    out.mkdir(parents=True, exist_ok=True)
    strangers = sorted(
        p.name
        for p in out.iterdir()
        if p.name not in (*ARRAY_FILES, META_FILE) and not p.name.startswith(".")
    )
    if strangers:
        raise FileExistsError(
            f"{out} already holds other files ({', '.join(strangers[:5])}); choose an empty or new directory"
        )
    # Drop the old meta first: if we die halfway, the directory reads as unfinished, not as the old dataset.
    (out / META_FILE).unlink(missing_ok=True)
    hashes: dict[str, str] = {}
    for split, (images, labels) in arrays.items():
        for part, arr in (("images", images), ("labels", labels.astype(np.int64))):
            fname = f"{split}_{part}.npy"
            with atomic_path(out / fname) as tmp:
                np.save(tmp, np.ascontiguousarray(arr), allow_pickle=False)
                hashes[fname] = _sha256(tmp)
    mean, std = channel_stats(arrays["train"][0])
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": name,
        "class_names": class_names,
        "num_classes": len(class_names),
        "counts": {split: len(arrays[split][1]) for split in SPLITS},
        "image_shape": list(arrays["train"][0].shape[1:]),
        "mean": mean,
        "std": std,
        "source": str(source),
        "sha256": hashes,
    }
    if conversion:
        meta["conversion"] = conversion
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta


class ArrayDataset:
    """A loaded array dataset; images are memory-mapped, labels are in memory (int64)."""

    def __init__(self, root: Path, meta: dict[str, Any], arrays: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.root = root
        self.meta = meta
        self._arrays = arrays

    @property
    def name(self) -> str:
        """Dataset name from meta.json."""
        return str(self.meta["name"])

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.meta["class_names"])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W) or (H, W, C)."""
        return tuple(self.meta["image_shape"])

    @property
    def mean(self) -> list[float]:
        """Per-channel mean of the train images in [0, 1]."""
        return list(self.meta["mean"])

    @property
    def std(self) -> list[float]:
        """Per-channel std of the train images in [0, 1]."""
        return list(self.meta["std"])

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of ``split`` ("train" or "test")."""
        if split not in self._arrays:
            raise KeyError(f"unknown split {split!r} of array dataset {self.root}; use one of {SPLITS}")
        return self._arrays[split]

    @property
    def train_images(self) -> np.ndarray:
        """Train images, memory-mapped."""
        return self._arrays["train"][0]

    @property
    def train_labels(self) -> np.ndarray:
        """Train labels (int64)."""
        return self._arrays["train"][1]

    @property
    def test_images(self) -> np.ndarray:
        """Test images, memory-mapped."""
        return self._arrays["test"][0]

    @property
    def test_labels(self) -> np.ndarray:
        """Test labels (int64)."""
        return self._arrays["test"][1]


def _read_meta(root: Path) -> dict[str, Any]:
    if not root.exists():
        raise FileNotFoundError(f"array dataset directory {root} does not exist; {_HOW_TO_MAKE}")
    if not root.is_dir():
        raise NotADirectoryError(f"array dataset path {root} is not a directory; {_HOW_TO_MAKE}")
    meta_path = root / META_FILE
    if not meta_path.is_file():
        partial = any((root / f).exists() for f in ARRAY_FILES)
        why = (
            " (it has array files, so an earlier conversion did not finish; run it again)" if partial else ""
        )
        raise FileNotFoundError(
            f"{root} is not a converted array dataset: it has no {META_FILE}{why}; {_HOW_TO_MAKE}"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{meta_path} is not valid JSON ({exc}); re-create the dataset ({_HOW_TO_MAKE})"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path} has format {got!r}, expected {FORMAT_NAME!r}; {_HOW_TO_MAKE}")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} is format version {meta.get('version')!r} but this toolkit reads version "
            f"{FORMAT_VERSION}; re-convert the dataset ({_HOW_TO_MAKE})"
        )
    required = ("name", "class_names", "counts", "image_shape", "mean", "std", "sha256")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks keys {missing}; re-convert the dataset ({_HOW_TO_MAKE})")
    return meta


def load_array_dataset(path: str | os.PathLike[str], verify_hash: bool = False) -> ArrayDataset:
    """Open and validate an array dataset directory; ``verify_hash`` also checks every file's sha256."""
    root = Path(path).expanduser()
    meta = _read_meta(root)
    num_classes = len(meta["class_names"])
    image_shape = tuple(meta["image_shape"])
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        loaded = []
        for part in ("images", "labels"):
            fpath = root / f"{split}_{part}.npy"
            if not fpath.is_file():
                raise FileNotFoundError(
                    f"array dataset {root} lacks {fpath.name}; re-convert it ({_HOW_TO_MAKE})"
                )
            if verify_hash:
                want = meta["sha256"].get(fpath.name)
                got = _sha256(fpath)
                if got != want:
                    raise ValueError(
                        f"{fpath} has sha256 {got} but meta.json records {want}: the file changed or is "
                        f"corrupt; re-convert the dataset ({_HOW_TO_MAKE})"
                    )
            try:
                loaded.append(np.load(fpath, mmap_mode="r" if part == "images" else None, allow_pickle=False))
            except ValueError as exc:
                raise ValueError(
                    f"{fpath} is not a readable .npy array ({exc}); re-convert the dataset"
                ) from exc
        images, labels = loaded
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != image_shape:
            raise ValueError(
                f"{root / f'{split}_images.npy'} holds {images.dtype} {images.shape}, but meta.json says "
                f"uint8 images of shape {image_shape}"
            )
        if labels.ndim != 1 or labels.dtype != np.int64:
            raise ValueError(
                f"{root / f'{split}_labels.npy'} holds {labels.dtype} {labels.shape}; expected int64 (N,)"
            )
        want_n = meta["counts"].get(split)
        if len(images) != len(labels) or len(labels) != want_n:
            raise ValueError(
                f"array dataset {root} split {split!r}: {len(images)} images, {len(labels)} labels, "
                f"meta.json count {want_n}; they must agree (re-convert the dataset)"
            )
        if len(labels) == 0:
            raise ValueError(f"array dataset {root} split {split!r} is empty; re-convert the dataset")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{root / f'{split}_labels.npy'} has labels in [{lo}, {hi}] but the dataset has "
                f"{num_classes} classes (0..{num_classes - 1})"
            )
        arrays[split] = (images, labels)
    return ArrayDataset(root, meta, arrays)


def is_array_dataset(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory with a ``meta.json`` of this format (contents not validated)."""
    try:
        _read_meta(Path(path).expanduser())
    except (OSError, ValueError):
        return False
    return True


def convert_fashion_mnist(
    out_dir: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
) -> Path:
    """Convert the four Fashion-MNIST IDX files (Debian package or ``root``) into an array dataset."""
    src = find_fashion_mnist(root).resolve()
    data = load_fashion_mnist(src)
    write_array_dataset(out_dir, FMNIST_NAME, data["train"], data["test"], CLASS_NAMES, source=str(src))
    return Path(out_dir)


def resolve_fmnist(
    dataset_dir: str | os.PathLike[str] | None,
    root: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str],
) -> Path:
    """Directory of a usable Fashion-MNIST array dataset.

    ``dataset_dir`` given: it must be a converted dataset (its errors are raised as they are).
    Otherwise the IDX files (``root`` or the Debian package) are converted once into
    ``cache_dir/fashion-mnist`` and reused while that copy is valid and came from the same source.
    """
    if dataset_dir is not None:
        return load_array_dataset(dataset_dir).root
    cached = Path(cache_dir).expanduser() / FMNIST_NAME
    src = find_fashion_mnist(root).resolve()
    try:
        ds = load_array_dataset(cached)
        if ds.meta.get("source") == str(src) and ds.name == FMNIST_NAME:
            return cached
    except (OSError, ValueError):
        # A missing, half-written or stale cache is simply rebuilt below.
        pass
    cached.parent.mkdir(parents=True, exist_ok=True)
    return convert_fashion_mnist(cached, src)
