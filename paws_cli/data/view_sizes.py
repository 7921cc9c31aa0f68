"""The views' sizes against the images' own size, checked (or set) when a run starts.

Views far from the images' native size are resampled from them: 20-px digits trained with a recipe's 28-px views
lost 3.3 points and ran 1.6x slower than at 20 px. At run start :func:`fit_views` therefore either sizes the views
from the data (``augment.size_from_data: true``: large views at the images' shorter side, small views scaled by
the recipe's small/large ratio) or, when the sizes differ, returns a warning with the exact overrides to pass.
Only in-memory datasets have one image size; ImageFolder and FFCV data keep the recipe's sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from paws_cli.config.schema import AugmentSettings, DataSettings, Settings

#: Known sizes of the datasets that are not read from a converted directory.
FASHION_MNIST_SIZE = (28, 28)
CIFAR10_SIZE = (32, 32)
MIN_VIEW = 8  # augment.*_size's lower bound


def native_size(data: DataSettings) -> tuple[int, int] | None:
    """(height, width) of the training images of an in-memory dataset, from its metadata; None otherwise."""
    if data.format != "memory":
        return None
    if data.dataset == "cifar10":
        return CIFAR10_SIZE
    if data.dataset == "fashion_mnist" and data.path is None:
        return FASHION_MNIST_SIZE
    if data.path is None:
        return None
    try:
        shape = json.loads((Path(data.path).expanduser() / "meta.json").read_text(encoding="utf-8"))[
            "image_shape"
        ]
        return int(shape[0]), int(shape[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # not a readable array dataset: loading it says why


def fitted_sizes(augment: AugmentSettings, native: tuple[int, int]) -> tuple[int, int]:
    """(large, small) view sides for images of ``native`` size, keeping the settings' small/large ratio."""
    large = max(MIN_VIEW, min(native))
    small = max(MIN_VIEW, round(large * augment.small_size / augment.large_size))
    return large, small


def fit_views(settings: Settings) -> tuple[Settings, list[str]]:
    """``settings`` with the views sized from the data when augment.size_from_data says so, and the lines to
    print at start (a note of the sizes chosen, or a warning with the overrides that would fit the data)."""
    a = settings.augment
    native = native_size(settings.data)
    if native is None:
        if a.size_from_data:
            note = (
                f"note: augment.size_from_data has no effect on data.dataset={settings.data.dataset} "
                f"data.format={settings.data.format} (its images have no single size): the views keep "
                f"augment.large_size={a.large_size} and augment.small_size={a.small_size}"
            )
            return settings, [note]
        return settings, []
    height, width = native
    large, small = fitted_sizes(a, native)
    if a.size_from_data:
        if (large, small) == (a.large_size, a.small_size):
            return settings, []
        note = (
            f"views sized from the data (augment.size_from_data): the images are {width}x{height} px, so the large "
            f"views are {large} px and the small ones {small} px (the recipe's {a.large_size} and {a.small_size})"
        )
        fitted = a.model_copy(update={"large_size": large, "small_size": small})
        return settings.model_copy(update={"augment": fitted}), [note]
    if a.large_size == large:
        return settings, []
    warning = (
        f"warning: the images are {width}x{height} px but the views are {a.large_size} px (large) and "
        f"{a.small_size} px (small): every view is resampled from {min(native)}-px images, which costs accuracy "
        f"and time. To train at the images' size pass augment.large_size={large} augment.small_size={small} "
        "(or augment.size_from_data=true)"
    )
    return settings, [warning]
