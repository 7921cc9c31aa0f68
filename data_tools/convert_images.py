"""Your own images or arrays into the toolkit's array format (``paws convert-dataset images|arrays``).

The array format (:mod:`paws_cli.data.datasets.arrays`) is the fast path for datasets that fit in memory: uint8
arrays read once, augmented in batches on the training device. Two sources:

- ``images``: a folder with one sub-folder per class (the folder name is the class name), holding images in any
  format Pillow reads (PNG, JPEG, BMP, GIF, TIFF, WebP, ...; grayscale or colour). Everything is checked before
  anything is written: an empty class folder, an unreadable file and images of several sizes are errors that
  name them (``--size N`` resizes every image to N x N instead; ``--on-bad-file skip`` leaves unreadable files
  out and lists them).
- ``arrays``: an ``.npz`` with ``x_train, y_train`` and optionally ``x_test, y_test`` (and ``class_names``).

Channels: a dataset whose images are all grayscale (by mode, or RGB with three equal channels) is stored with one
channel; otherwise every image is converted to RGB and the report says how many were grayscale. The test split
is the ``--test-dir`` folder (same class names) or ``x_test``; without one, a seeded ``--test-fraction`` of each
class is held out and never trained on, and the report and ``meta.json`` say so.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from paws_cli.data.datasets.arrays import write_array_dataset

#: How a resized image is resampled (stated in the report and in meta.json).
RESAMPLING = "LANCZOS"
#: Pillow modes that are single-channel images.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
DEFAULT_TEST_FRACTION = 0.2


@dataclass
class Converted:
    """What a conversion wrote: the meta dict of the dataset and the lines of its report."""

    out: Path
    meta: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the stored images."""
        shape = self.meta["image_shape"]
        return int(shape[0]), int(shape[1])


@dataclass
class _Images:
    """Decoded images of one folder (before the channel decision): arrays, labels and file names."""

    arrays: list[np.ndarray]
    labels: list[int]
    files: list[Path]
    bad: list[tuple[Path, str]] = field(default_factory=list)
    resized: int = 0


def image_suffixes() -> set[str]:
    """File suffixes (lower case, with the dot) of the formats Pillow can open."""
    from PIL import Image

    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _shown(paths: Sequence[Any], limit: int = 5) -> str:
    text = ", ".join(str(p) for p in paths[:limit])
    return text + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def scan_class_folders(root: Path, what: str) -> tuple[list[str], list[list[Path]], list[Path]]:
    """(class names, image files per class, ignored non-image files) of a folder of class folders.

    Hidden files and folders are skipped; files whose suffix no Pillow format opens are ignored (and returned).
    ``what`` names the folder in messages ("SRC", "--test-dir").
    """
    if not root.exists():
        raise FileNotFoundError(
            f"{what} {root} does not exist; give a folder with one sub-folder of images per class"
        )
    if not root.is_dir():
        raise NotADirectoryError(
            f"{what} {root} is not a folder; give a folder with one sub-folder per class"
        )
    suffixes = image_suffixes()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in suffixes][:3]
        hint = f" (it holds images directly, e.g. {loose}: their class is unknown)" if loose else ""
        raise FileNotFoundError(
            f"{what} {root} has no class folders{hint}: expected {root}/<class>/<image>, e.g. {root}/cat/001.png"
        )
    files: list[list[Path]] = []
    ignored: list[Path] = []
    for name in classes:
        found = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        files.append([p for p in found if p.suffix.lower() in suffixes])
        ignored += [p for p in found if p.suffix.lower() not in suffixes]
    return classes, files, ignored


def _decode(path: Path, size: int | None) -> tuple[np.ndarray, bool]:
    """uint8 (H, W) for grayscale images, (H, W, 3) for colour ones, resized to size x size when given; and
    whether it was resized."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)  # a camera's rotation flag, as viewers apply it
        image.load()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        wide = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if wide.max() > 255 else 1.0  # 16-bit images scaled, 8-bit values kept
        image = Image.fromarray(np.clip(np.rint(wide * scale), 0, 255).astype(np.uint8), mode="L")
    elif image.mode in GRAY_MODES:
        image = image.convert("L")
    else:
        image = image.convert("RGB")  # palette, CMYK, RGBA (alpha dropped) and the like
    resized = size is not None and image.size != (size, size)
    if resized:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8), resized


def _read_folder(files: list[list[Path]], size: int | None) -> _Images:
    out = _Images([], [], [])
    for label, class_files in enumerate(files):
        for path in class_files:
            try:
                array, resized = _decode(path, size)
            except Exception as exc:  # any decoding failure makes the file unusable: named below
                out.bad.append(
                    (path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
                )
                continue
            out.resized += resized
            out.arrays.append(array)
            out.labels.append(label)
            out.files.append(path)
    return out


def _check_sizes(images: _Images, root: Path) -> None:
    """Refuse images of several sizes, listing them with examples and the option that resizes them."""
    sizes: Counter[tuple[int, int]] = Counter()
    example: dict[tuple[int, int], Path] = {}
    for array, path in zip(images.arrays, images.files, strict=True):
        key = (int(array.shape[0]), int(array.shape[1]))
        sizes[key] += 1
        example.setdefault(key, path)
    if len(sizes) <= 1:
        return
    listed = "; ".join(
        f"{w}x{h} px: {n} image(s), e.g. {example[(h, w)].relative_to(root)}"
        for (h, w), n in sizes.most_common()
    )
    (common_h, common_w), _ = sizes.most_common(1)[0]
    raise ValueError(
        f"the images of {root} have {len(sizes)} different sizes ({listed}); the array format stores one size. "
        f"Pass --size {max(common_h, common_w)} to resize every image to {max(common_h, common_w)}x"
        f"{max(common_h, common_w)} px (Pillow {RESAMPLING}, aspect ratio not kept), or resize them yourself"
    )


def _stack(arrays: list[np.ndarray], notes: list[str], what: str) -> np.ndarray:
    """(N, H, W) if every image is grayscale (by mode, or RGB with equal channels), else (N, H, W, 3)."""
    colour = [a for a in arrays if a.ndim == 3]
    gray_rgb = sum(1 for a in colour if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
    if gray_rgb == len(colour):
        if colour:
            notes.append(
                f"{what}: the {len(colour)} RGB image(s) have three equal channels: stored as grayscale"
            )
        return np.stack([a if a.ndim == 2 else a[..., 0] for a in arrays])
    gray = len(arrays) - len(colour)
    if gray:
        notes.append(f"{what}: {gray} grayscale image(s) converted to RGB (the dataset holds colour images)")
    return np.stack([np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays])


def _same_channels(train: np.ndarray, test: np.ndarray, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Give both splits 3 channels when one of them is colour."""
    if train.ndim == test.ndim:
        return train, test
    notes.append("one split is grayscale and the other colour: the grayscale one converted to RGB")
    widen = lambda x: x if x.ndim == 4 else np.repeat(x[..., None], 3, axis=3)  # noqa: E731
    return widen(train), widen(test)


def carve_test_split(
    labels: np.ndarray, fraction: float, seed: int, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): a seeded ``fraction`` of each class held out (at least 1, never all)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--test-fraction must be between 0 and 1 (exclusive), got {fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c, name in enumerate(class_names):
        ids = np.flatnonzero(labels == c)
        if len(ids) < 2:
            raise ValueError(
                f"class {name!r} has {len(ids)} image(s): a test image cannot be held out from it; add images "
                "or give a test split (--test-dir for folders, x_test/y_test for arrays)"
            )
        k = min(max(round(len(ids) * fraction), 1), len(ids) - 1)
        chosen = rng.permutation(ids)
        test.append(np.sort(chosen[:k]))
        train.append(np.sort(chosen[k:]))
    return np.concatenate(train), np.concatenate(test)


def _read_split_folder(
    root: Path,
    what: str,
    size: int | None,
    on_bad_file: str,
    notes: list[str],
    classes: list[str] | None = None,
) -> tuple[list[str], _Images]:
    """Scan and decode one folder of class folders; ``classes`` (the train's) fixes the labels of a test folder."""
    found, files, ignored = scan_class_folders(root, what)
    is_train = classes is None
    if ignored:
        notes.append(f"{what}: ignored {len(ignored)} file(s) that are not images: {_shown(ignored, 3)}")
    empty = [str(root / name) for name, fs in zip(found, files, strict=True) if not fs]
    if classes is None:
        if empty:
            raise ValueError(
                f"{len(empty)} class folder(s) of {what} {root} hold no images: {_shown(empty)}; add their images "
                "or remove the folders"
            )
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise ValueError(
                f"{what} {root} has class folder(s) that the training folder lacks: {_shown(extra)}; the test "
                f"classes must be among the training classes ({_shown(classes)})"
            )
        missing = sorted(set(classes) - {n for n, fs in zip(found, files, strict=True) if fs})
        if missing:
            notes.append(f"{what}: no test images of class(es) {_shown(missing)}")
        order = {name: i for i, name in enumerate(classes)}
        relabelled: list[list[Path]] = [[] for _ in classes]
        for name, fs in zip(found, files, strict=True):
            relabelled[order[name]] = fs
        files = relabelled
    images = _read_folder(files, size)
    if images.bad:
        listed = "; ".join(f"{p} ({why})" for p, why in images.bad[:10])
        more = f" and {len(images.bad) - 10} more" if len(images.bad) > 10 else ""
        if on_bad_file == "stop":
            raise ValueError(
                f"{len(images.bad)} file(s) of {what} {root} cannot be read as images: {listed}{more}. Fix or remove "
                "them, or pass --on-bad-file skip to leave them out (they are listed in the report)"
            )
        notes.append(f"{what}: skipped {len(images.bad)} unreadable file(s): {listed}{more}")
        lost = [name for c, name in enumerate(classes) if c not in set(images.labels) and files[c]]
        if lost and is_train:
            raise ValueError(
                f"every image of class(es) {_shown(lost)} is unreadable; the class would be empty"
            )
    if size is None:
        _check_sizes(images, root)
    return classes, images


def convert_images(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    test_dir: str | os.PathLike[str] | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    size: int | None = None,
    on_bad_file: Literal["stop", "skip"] = "stop",
    name: str | None = None,
) -> Converted:
    """Convert a folder of class folders (and an optional test folder) into an array dataset in ``out``."""
    if on_bad_file not in ("stop", "skip"):
        raise ValueError(f"--on-bad-file must be stop or skip, got {on_bad_file!r}")
    if size is not None and size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {size}")
    root = Path(src).expanduser().resolve()
    notes: list[str] = []
    classes, train = _read_split_folder(root, "SRC", size, on_bad_file, notes)
    train_x = _stack(train.arrays, notes, "SRC")
    train_y = np.asarray(train.labels, dtype=np.int64)
    conversion: dict[str, Any] = {"tool": "paws convert-dataset images", "source": str(root)}
    if test_dir is not None:
        test_root = Path(test_dir).expanduser().resolve()
        _, test = _read_split_folder(test_root, "--test-dir", size, on_bad_file, notes, classes)
        if not test.arrays:
            raise ValueError(f"--test-dir {test_root} holds no readable images")
        test_x = _stack(test.arrays, notes, "--test-dir")
        test_y = np.asarray(test.labels, dtype=np.int64)
        if test_x.shape[1:3] != train_x.shape[1:3]:
            raise ValueError(
                f"the test images are {test_x.shape[2]}x{test_x.shape[1]} px but the training images are "
                f"{train_x.shape[2]}x{train_x.shape[1]} px; pass --size N to resize both to N x N"
            )
        train_x, test_x = _same_channels(train_x, test_x, notes)
        conversion["test_split"] = f"folder {test_root}"
    else:
        train_ids, test_ids = carve_test_split(train_y, test_fraction, seed, classes)
        train_x, test_x = train_x[train_ids], train_x[test_ids]
        train_y, test_y = train_y[train_ids], train_y[test_ids]
        conversion["test_split"] = f"held out {test_fraction:g} of each class's images (seed {seed})"
        notes.append(
            f"no --test-dir: {len(test_y)} images ({test_fraction:g} of each class, seed {seed}) are held out as "
            "the test split, never trained on; pass --test-dir DIR to evaluate on images of your own choosing"
        )
    if size is not None:
        resized = train.resized + (test.resized if test_dir is not None else 0)
        total = len(train.arrays) + (len(test.arrays) if test_dir is not None else 0)
        text = f"{resized} of {total} images to {size}x{size} px (Pillow {RESAMPLING}, aspect ratio not kept)"
        conversion["resized"] = text
        notes.append(f"resized {text}")
    conversion["skipped_files"] = [str(p) for p, _ in train.bad][:100]
    label = name or (root.parent.name if root.name.lower() in ("train", "training") else root.name)
    meta = write_array_dataset(
        out, label, (train_x, train_y), (test_x, test_y), classes, str(root), conversion
    )
    return Converted(Path(out), meta, notes)


def _as_uint8_images(x: np.ndarray, key: str, notes: list[str]) -> np.ndarray:
    """(N, H, W) or (N, H, W, 3) uint8 from (N, H, W), (N, H, W, 1|3|4) or channels-first (N, 1|3, H, W)."""
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3, 4):
        notes.append(f"{key}: channels-first {x.shape} transposed to channels-last")
        x = np.moveaxis(x, 1, -1)
    if x.ndim == 4 and x.shape[-1] == 4:
        notes.append(f"{key}: alpha channel dropped")
        x = x[..., :3]
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3):
        raise ValueError(
            f"{key} has shape {x.shape}; expected (N, H, W) grayscale or (N, H, W, 3) colour images "
            "(channels-first (N, C, H, W) is transposed)"
        )
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) and x.size and x.min() >= 0 and x.max() <= 255:
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"{key} holds {x.dtype} values in [{x.min():g}, {x.max():g}]; store 8-bit images: "
            "np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for values in [0, 1], or x.astype(np.uint8) "
            "for values in [0, 255]"
        )
    raise ValueError(f"{key} holds {x.dtype} values outside [0, 255]; store uint8 images")


def _label_codes(
    y_train: np.ndarray, y_test: np.ndarray | None, names: Sequence[str] | None, notes: list[str]
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Labels as 0..K-1 with their class names (given, or the distinct label values in sorted order)."""
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        if y is not None and y.ndim != 1:
            raise ValueError(f"{key} has shape {y.shape}; expected one label per image (N,)")
    if names is not None:
        if not np.issubdtype(y_train.dtype, np.integer):
            raise ValueError("with class_names, the labels must be integers 0..K-1")
        for key, y in (("y_train", y_train), ("y_test", y_test)):
            if y is not None and len(y) and (y.min() < 0 or y.max() >= len(names)):
                raise ValueError(
                    f"{key} has labels in [{y.min()}, {y.max()}] but class_names has {len(names)} names"
                )
        empty = [n for c, n in enumerate(names) if not (y_train == c).any()]
        if empty:
            raise ValueError(f"class(es) {_shown(empty)} of class_names have no training images")
        return y_train.astype(np.int64), None if y_test is None else y_test.astype(np.int64), list(names)
    values = np.unique(y_train)
    if y_test is not None:
        unseen = np.setdiff1d(np.unique(y_test), values)
        if len(unseen):
            raise ValueError(f"y_test has label(s) {_shown(unseen.tolist())} that no training image has")
    codes = np.searchsorted(values, y_train)
    names = [str(v) for v in values.tolist()]
    if not np.issubdtype(values.dtype, np.integer) or values.tolist() != list(range(len(values))):
        notes.append(
            f"labels {_shown(names, 10)} numbered 0..{len(values) - 1} in that order (class names kept)"
        )
    test_codes = None if y_test is None else np.searchsorted(values, y_test).astype(np.int64)
    return codes.astype(np.int64), test_codes, names


def convert_arrays(
    npz: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    name: str | None = None,
) -> Converted:
    """Convert an ``.npz`` of ``x_train, y_train[, x_test, y_test][, class_names]`` into an array dataset."""
    path = Path(npz).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; give an .npz made with np.savez(FILE, x_train=..., y_train=...)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable .npz of plain arrays ({exc})") from None
    notes: list[str] = []
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise ValueError(
            f"{path} lacks {missing}; it holds {sorted(arrays)} (expected x_train, y_train[, x_test, y_test])"
        )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"{path} has only one of x_test and y_test; give both or neither")
    unknown = sorted(set(arrays) - {"x_train", "y_train", "x_test", "y_test", "class_names"})
    if unknown:
        notes.append(f"ignored array(s) {unknown}")
    for split in ("train", "test"):
        x, y = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
        if x is not None and y is not None and len(x) != len(y):
            raise ValueError(f"x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
    train_x = _as_uint8_images(arrays["x_train"], "x_train", notes)
    names = [str(n) for n in arrays["class_names"].tolist()] if "class_names" in arrays else None
    test_y_raw = arrays.get("y_test")
    train_y, test_y, names = _label_codes(arrays["y_train"], test_y_raw, names, notes)
    conversion: dict[str, Any] = {"tool": "paws convert-dataset arrays", "source": str(path)}
    if "x_test" in arrays:
        test_x = _as_uint8_images(arrays["x_test"], "x_test", notes)
        if test_x.shape[1:3] != train_x.shape[1:3]:
            raise ValueError(
                f"x_test images are {test_x.shape[1:3]} but x_train images are {train_x.shape[1:3]}"
            )
        train_x, test_x = _same_channels(train_x, test_x, notes)
        conversion["test_split"] = "x_test, y_test"
    else:
        train_ids, test_ids = carve_test_split(train_y, test_fraction, seed, names)
        train_x, test_x = train_x[train_ids], train_x[test_ids]
        train_y, test_y = train_y[train_ids], train_y[test_ids]
        conversion["test_split"] = f"held out {test_fraction:g} of each class's images (seed {seed})"
        notes.append(
            f"no x_test/y_test: {len(test_y)} images ({test_fraction:g} of each class, seed {seed}) are held out "
            "as the test split, never trained on"
        )
    assert test_y is not None
    label = name or path.stem
    meta = write_array_dataset(out, label, (train_x, train_y), (test_x, test_y), names, str(path), conversion)
    return Converted(Path(out), meta, notes)
