"""What ``data.path`` holds, so that ``data.path=DIR`` alone is enough for every command.

The kind of data (``data.dataset`` and ``data.format``) is read from the path when it exists:

- a directory with the ``meta.json`` of `paws convert-dataset` -> ``array`` (``memory``);
- a ``cifar-10-batches-py`` folder (``data_batch_1``, ``test_batch``) -> ``cifar10`` (``memory``);
- a ``.beton`` file -> ``imagefolder`` (``ffcv``);
- a folder of class folders holding images -> ``imagefolder`` (``folder``).

The detected kind replaces the one a recipe (or a checkpoint's settings) gives, so that a run records what it
really trained on (``resolved_config.yaml``); a ``data.dataset`` or ``data.format`` given explicitly (an override
or a ``PAWS_DATA__...`` variable) that contradicts the path is an error naming both. A path that does not exist
(yet: a reproduction plan names files it will write) is left to the loaders, whose errors say how to make one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from paws_cli.config.errors import ConfigError

#: meta.json's format tag of the toolkit's array datasets (paws_cli.data.datasets.arrays.FORMAT_NAME).
ARRAY_FORMAT = "paws-array-dataset"
#: How to make each kind of dataset, for messages about a data.path that does not hold one.
HOW_TO_MAKE = {
    "array": "make one with `paws convert-dataset images SRC OUT` (one sub-folder of images per class), "
    "`paws convert-dataset arrays FILE.npz OUT` (x_train, y_train[, x_test, y_test]) or "
    "`paws convert-dataset fashion-mnist OUT`",
    "cifar10": "download and unpack https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and give its "
    "cifar-10-batches-py folder",
    "folder": "give an ImageFolder root (one sub-folder of images per class)",
    "ffcv": "make one with `paws convert-dataset imagefolder SRC OUT.beton`",
}


def _has_images(folder: Path, limit: int = 200) -> bool:
    """True when ``folder`` holds an image file (looking at no more than ``limit`` entries)."""
    from PIL import Image

    suffixes = {ext.lower() for ext in Image.registered_extensions()}
    for i, entry in enumerate(folder.iterdir()):
        if i >= limit:
            return False
        if entry.is_file() and entry.suffix.lower() in suffixes:
            return True
    return False


def detect_kind(path: str | Path) -> tuple[str, str, str] | None:
    """(data.dataset, data.format, what was seen) for the data at ``path``; None when it is not recognised."""
    root = Path(path).expanduser()
    if root.is_file():
        if root.suffix == ".beton":
            return "imagefolder", "ffcv", "an FFCV .beton"
        if root.suffix == ".npz":
            raise ConfigError(
                f"data.path={path} is an .npz file: convert it first with `paws convert-dataset arrays {path} "
                "OUT`, then pass data.path=OUT"
            )
        return None
    if not root.is_dir():
        return None
    meta = root / "meta.json"
    if meta.is_file():
        try:
            tag = json.loads(meta.read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            tag = None
        if tag == ARRAY_FORMAT:
            return "array", "memory", "an array dataset (meta.json of `paws convert-dataset`)"
    if (root / "data_batch_1").is_file() and (root / "test_batch").is_file():
        return "cifar10", "memory", "a cifar-10-batches-py folder"
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and {p.name for p in subdirs} <= {"train", "val", "test"}:
        raise ConfigError(
            f"data.path={path} holds the split folders {[p.name for p in subdirs]}: convert them into the "
            f"in-memory format with `paws convert-dataset images {root / subdirs[0].name} OUT --test-dir "
            f"{root / subdirs[-1].name}` and pass data.path=OUT, or give one split's ImageFolder root"
        )
    if subdirs and any(_has_images(d) for d in subdirs[:3]):
        return "imagefolder", "folder", "a folder of class folders of images"
    return None


def _compatible(explicit: str, detected: str, root: Path) -> bool:
    if explicit == detected:
        return True
    if explicit == "fashion_mnist" and detected == "array":  # a converted Fashion-MNIST is an array dataset
        try:
            return json.loads((root / "meta.json").read_text(encoding="utf-8")).get("name") == "fashion-mnist"
        except (OSError, ValueError):
            return False
    return False


def apply_detected_kind(tree: dict[str, Any], explicit: Mapping[str, str]) -> dict[str, Any]:
    """``tree`` with data.dataset/data.format set from what data.path holds (see the module doc).

    ``explicit`` maps the dotted keys given explicitly (overrides, environment) to where they came from.
    """
    data = tree.get("data")
    path = data.get("path") if isinstance(data, Mapping) else None
    if not isinstance(path, str) or not path:
        return tree
    found = detect_kind(path)
    if found is None:
        return tree
    dataset, fmt, seen = found
    assert isinstance(data, Mapping)
    for key, value in (("dataset", dataset), ("format", fmt)):
        given = data.get(key)
        source = explicit.get(f"data.{key}")
        if source is not None and given is not None and not _compatible(str(given), value, Path(path)):
            raise ConfigError(
                f"data.{key}={given} [from {source}] contradicts data.path={path}, which holds {seen} "
                f"(data.{key}={value}); drop the data.{key} override (the kind is read from data.path) or "
                "point data.path at the data you mean"
            )
    out = dict(tree)
    new = dict(data)
    if "data.dataset" not in explicit:
        new["dataset"] = dataset
    if "data.format" not in explicit:
        new["format"] = fmt
    out["data"] = new
    return out
