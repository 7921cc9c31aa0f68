"""Convert a supported dataset into the toolkit's array-dataset format (``paws convert-dataset fashion-mnist``).

ImageFolder datasets (ImageNet layout) are converted into FFCV files instead, by
:mod:`data_tools.convert_imagefolder` (``paws convert-dataset imagefolder SRC_DIR OUT.beton``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from paws_cli.data.datasets import arrays


def convert_fashion_mnist(
    out_dir: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
) -> Path:
    """Fashion-MNIST IDX files (``root``, else the Debian package) -> array dataset in ``out_dir``.

    Prints nothing; returns ``out_dir`` as a Path (its ``meta.json`` holds the metadata).
    """
    return arrays.convert_fashion_mnist(out_dir, root)


#: Dataset name on the command line -> converter(out_dir, root).
CONVERTERS: dict[str, Callable[[str | os.PathLike[str], str | os.PathLike[str] | None], Path]] = {
    "fashion-mnist": convert_fashion_mnist,
}


def convert_dataset(
    name: str, out_dir: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
) -> Path:
    """Dispatch ``paws convert-dataset NAME OUT``; unknown names list the supported ones."""
    key = name.strip().lower()
    if key not in CONVERTERS:
        raise ValueError(
            f"cannot convert dataset {name!r}: supported datasets are {sorted(CONVERTERS)} (and an ImageNet-layout "
            "folder into an FFCV file: `paws convert-dataset imagefolder SRC_DIR OUT.beton`)"
        )
    return CONVERTERS[key](out_dir, root)
