"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or the same four IDX files anywhere).

The IDX format (LeCun's MNIST format): two zero bytes, a type code, the number of dimensions, then one
big-endian uint32 per dimension, then the row-major big-endian data. Spec: PAWS-SPEC.md section 11.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

#: Where the Debian package installs the files.
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

#: The four files, keyed by (split, part); a plain (un-gzipped) copy without ``.gz`` is accepted too.
FILES: dict[tuple[str, str], str] = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}

#: Class names in label order, as published with the dataset.
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

IMAGE_SIZE = 28
EXPECTED_COUNTS = {"train": 60000, "test": 10000}

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"

INSTALL_HELP = (
    "Install it with `sudo apt-get install dataset-fashion-mnist`, or without root: "
    "`apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb DIR` "
    "and then pass `data.root=DIR/usr/share/datasets/fashion-mnist`."
)


def _read_raw(path: Path) -> bytes:
    """Whole file content, transparently gunzipped (detected by content, not by file name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file {path} does not exist") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        # BadGzipFile is an OSError; a cut-off stream raises EOFError.
        raise ValueError(
            f"IDX file {path} is a corrupt or truncated gzip stream ({exc}); re-download or reinstall it"
        ) from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into a native-endian array, validating header and size."""
    path = Path(path)
    data = _read_raw(path)
    if len(data) < 4:
        raise ValueError(f"IDX file {path} is truncated: {len(data)} bytes, too short for the 4-byte magic")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"IDX file {path} has a bad magic number {data[:4].hex()} (expected 0000TTNN); "
            "it is not an IDX file or it is corrupt"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(
            f"IDX file {path} has unknown data type code 0x{type_code:02x} "
            f"(known: {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})"
        )
    if ndim == 0:
        raise ValueError(f"IDX file {path} declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"IDX file {path} is truncated inside its header ({len(data)} bytes, header needs {header_len})"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow on absurd headers
    found = len(data) - header_len
    if found < expected:
        raise ValueError(
            f"IDX file {path} is truncated: shape {dims} needs {expected} data bytes, found {found}"
        )
    if found > expected:
        raise ValueError(
            f"IDX file {path} has {found - expected} unexpected trailing bytes after shape {dims}; "
            "it is corrupt"
        )
    flat = np.frombuffer(data, dtype=dtype, offset=header_len)
    # astype copies into a writable, native-endian array.
    return flat.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def _locate(root: Path, gz_name: str) -> Path | None:
    for name in (gz_name, gz_name.removesuffix(".gz")):
        candidate = root / name
        if candidate.is_file():
            return candidate
    return None


def _missing_files(root: Path) -> list[str]:
    return [name for name in FILES.values() if _locate(root, name) is None]


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding the four Fashion-MNIST files: ``root`` if given, else the Debian package's."""
    if root is not None:
        where = Path(root).expanduser()
        if not where.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST root {where} (data.root) is not a directory")
        missing = _missing_files(where)
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST root {where} (data.root) is missing {len(missing)} of the 4 files: "
                f"{', '.join(missing)}. {INSTALL_HELP}"
            )
        return where
    missing = _missing_files(DEFAULT_ROOT) if DEFAULT_ROOT.is_dir() else list(FILES.values())
    if not missing:
        return DEFAULT_ROOT
    raise FileNotFoundError(
        f"Fashion-MNIST not found: {DEFAULT_ROOT} lacks {', '.join(missing)} "
        f"(the Debian package dataset-fashion-mnist is not installed). {INSTALL_HELP}"
    )


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}``: uint8 (N, 28, 28) and int64 (N,)."""
    where = find_fashion_mnist(root)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "test"):
        img_path = _locate(where, FILES[(split, "images")])
        lab_path = _locate(where, FILES[(split, "labels")])
        assert img_path is not None and lab_path is not None  # guaranteed by find_fashion_mnist
        images = read_idx(img_path)
        labels = read_idx(lab_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"{img_path} holds {images.dtype} {images.shape}; Fashion-MNIST images are uint8 (N, 28, 28)"
            )
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise ValueError(f"{lab_path} holds {labels.dtype} {labels.shape}; expected uint8 labels (N,)")
        if len(labels) != len(images):
            raise ValueError(
                f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels; "
                "the files do not belong together"
            )
        if len(labels) and int(labels.max()) >= len(CLASS_NAMES):
            raise ValueError(
                f"{lab_path} has label {int(labels.max())}; "
                f"Fashion-MNIST has {len(CLASS_NAMES)} classes (0-9)"
            )
        out[split] = (images, labels.astype(np.int64))
    return out
