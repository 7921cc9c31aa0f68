"""CIFAR-10 from its standard python-pickle folder (``cifar-10-batches-py``), loaded into memory.

The folder holds ``data_batch_1`` .. ``data_batch_5`` (the 50,000 training images, in that order: the official
PAWS split files ``spc.4000_split.*.txt`` index into exactly this order, as torchvision's ``CIFAR10`` does) and
``test_batch`` (10,000 images). Each is a pickled dict with ``b'data'``, a (N, 3072) uint8 array holding the red,
green and blue 32x32 planes of each image, and ``b'labels'``, N class ids. ``batches.meta`` names the classes.

The result is an :class:`~paws_cli.data.datasets.arrays.ArrayDataset` (images (N, 32, 32, 3) uint8, int64 labels, channel
mean/std of the training images), so training, k-NN evaluation and fine-tuning use the in-memory path unchanged.

Pickles can run code when loaded, so the files are read by an unpickler that only builds plain containers and
numpy arrays: a file that asks for anything else is rejected as not a CIFAR-10 batch.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from paws_cli.data.datasets.arrays import ArrayDataset, channel_stats

NAME = "cifar10"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_BATCH = "batches.meta"
#: The class names of CIFAR-10 in label order (used when batches.meta is absent).
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SIDE = 32
_PIXELS = 3 * SIDE * SIDE
_HOW_TO_GET = (
    "download and unpack cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) and set "
    "data.path to its cifar-10-batches-py folder"
)

# The globals a numpy array pickle may name (old numpy.core and numpy 2's numpy._core spellings), and the two
# harmless builtins pickles use for raw bytes (protocol 2 from Python 3: _codecs.encode; protocol 5: bytearray).
_ALLOWED = {
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy's array-rebuilding globals."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never does")
        # numpy 2 keeps the old numpy.core names importable; map them to the current module either way.
        module = module.replace("numpy.core.", "numpy._core.")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[Any, Any]:
    """The dict stored in ``path``, with clear errors for a missing or unreadable file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 batch {path} is missing; the folder must hold {', '.join(TRAIN_BATCHES)} and "
            f"{TEST_BATCH}: {_HOW_TO_GET}"
        )
    try:
        with open(path, "rb") as fh:
            content = _ArrayUnpickler(fh, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as exc:
        raise ValueError(
            f"CIFAR-10 batch {path} is corrupt or not a CIFAR-10 python batch ({type(exc).__name__}: {exc}); "
            f"re-download it: {_HOW_TO_GET}"
        ) from exc
    if not isinstance(content, dict):
        raise ValueError(
            f"CIFAR-10 batch {path} holds a {type(content).__name__}, not the expected dict; {_HOW_TO_GET}"
        )
    return content


def _field(content: dict[Any, Any], key: str) -> Any:
    """``content[key]`` whether the file was written with byte keys (the original) or str keys."""
    for candidate in (key.encode(), key):
        if candidate in content:
            return content[candidate]
    return None


def read_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of one CIFAR-10 batch file."""
    path = Path(path)
    content = _unpickle(path)
    data, labels = _field(content, "data"), _field(content, "labels")
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in content)
        raise ValueError(
            f"CIFAR-10 batch {path} lacks 'data' or 'labels' (it has {keys}); it is not a CIFAR-10 batch "
            "(CIFAR-100 uses 'fine_labels')"
        )
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise ValueError(
            f"CIFAR-10 batch {path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, {_PIXELS}) "
            "(three 32x32 colour planes per image); the file is corrupt"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"CIFAR-10 batch {path}: {len(data)} images but labels of shape {labels.shape} ({labels.dtype}); "
            "the file is corrupt"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(CLASS_NAMES)):
        raise ValueError(
            f"CIFAR-10 batch {path}: labels span [{int(labels.min())}, {int(labels.max())}], outside 0..9; "
            "it is not a CIFAR-10 batch"
        )
    # Planes (R, G, B) of 32 rows each -> (N, H, W, C), the array dataset's layout.
    images = np.ascontiguousarray(data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)


def _class_names(root: Path) -> list[str]:
    meta_path = root / META_BATCH
    if not meta_path.is_file():
        return list(CLASS_NAMES)
    names = _field(_unpickle(meta_path), "label_names")
    if not isinstance(names, list) or len(names) != len(CLASS_NAMES):
        raise ValueError(
            f"{meta_path} does not list the {len(CLASS_NAMES)} CIFAR-10 class names under 'label_names'; "
            f"it is corrupt or belongs to another dataset: {_HOW_TO_GET}"
        )
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar10(path: str | os.PathLike[str]) -> ArrayDataset:
    """Read the cifar-10-batches-py folder at ``path`` into an in-memory ArrayDataset (train, then test)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.path={root} does not exist; {_HOW_TO_GET}")
    if not root.is_dir():
        raise NotADirectoryError(f"data.path={root} is not a folder; {_HOW_TO_GET}")
    if (root / "cifar-10-batches-py").is_dir() and not (root / TRAIN_BATCHES[0]).exists():
        raise FileNotFoundError(
            f"{root} holds a cifar-10-batches-py folder: set data.path={root / 'cifar-10-batches-py'}"
        )
    train = [read_batch(root / name) for name in TRAIN_BATCHES]
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    test_images, test_labels = read_batch(root / TEST_BATCH)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        if len(labels) == 0:
            raise ValueError(f"the CIFAR-10 {split} batches in {root} hold no images; {_HOW_TO_GET}")
    mean, std = channel_stats(train_images)
    meta = {
        "name": NAME,
        "class_names": _class_names(root),
        "counts": {"train": len(train_labels), "test": len(test_labels)},
        "image_shape": [SIDE, SIDE, 3],
        "mean": mean,
        "std": std,
        "source": str(root.resolve()),
    }
    return ArrayDataset(
        root, meta, {"train": (train_images, train_labels), "test": (test_images, test_labels)}
    )
