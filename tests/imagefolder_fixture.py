"""A small ImageNet-layout folder of real JPEGs, generated from the photos that scikit-image ships.

Each class is one photo; its images are seeded random crops of it (random position, scale, aspect ratio and a
small brightness change), resized to ImageNet-like sizes and saved as JPEG. Class folders and file names follow
ImageNet's (``n0XXXXXXX/n0XXXXXXX_123.JPEG``), so code that reads official split lists can be tested on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: scikit-image photos used as classes (colour ones first; grey ones are tinted to RGB).
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "page",
    "text",
)


def wnid(label: int) -> str:
    """An ImageNet-style class folder name for class `label`."""
    return f"n{1440764 + 1000 * label:08d}"


def _photo(name: str, label: int) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:  # grey photo -> a tinted RGB image, so colour statistics differ between classes
        tint = np.array([1.0, 0.85 + 0.03 * (label % 5), 0.7 + 0.05 * (label % 4)])
        image = np.clip(image[..., None].astype(np.float64) * tint, 0, 255).astype(np.uint8)
    return image[..., :3]


def make_imagefolder(
    root: str | Path,
    *,
    num_classes: int = 10,
    per_class: int = 8,
    val_per_class: int = 2,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    seed: int = 0,
    file_names: Sequence[str] | None = None,
) -> Path:
    """Write ``root/train/<wnid>/<wnid>_<i>.JPEG`` and ``root/val/<wnid>/...``; return ``root``.

    size: (width, height) of most images; every third image is portrait and sizes vary by up to 20%, as in
    ImageNet. file_names: optional ImageNet names (``n01440764_10026.JPEG``) to create in ``train`` instead of
    the generated ones; their class folder is taken from the name (classes beyond the photos reuse photos).
    """
    if num_classes > len(PHOTOS) and file_names is None:
        raise ValueError(f"at most {len(PHOTOS)} classes (one scikit-image photo each)")
    root = Path(root)
    rng = np.random.default_rng(seed)
    photos: dict[int, np.ndarray] = {}

    def photo(label: int) -> np.ndarray:
        if label not in photos:
            photos[label] = _photo(PHOTOS[label % len(PHOTOS)], label)
        return photos[label]

    def write(path: Path, label: int) -> None:
        src = photo(label)
        h, w = src.shape[:2]
        scale = rng.uniform(0.35, 1.0)
        ratio = rng.uniform(3 / 4, 4 / 3)
        ch = max(16, min(h, int(h * scale / np.sqrt(ratio))))
        cw = max(16, min(w, int(w * scale * np.sqrt(ratio))))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = src[y : y + ch, x : x + cw].astype(np.float32) * rng.uniform(0.8, 1.2)
        out_w, out_h = (int(s * rng.uniform(0.8, 1.2)) for s in size)
        if rng.random() < 1 / 3:
            out_w, out_h = out_h, out_w
        image = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((out_w, out_h), Image.BILINEAR)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="JPEG", quality=quality)

    if file_names is not None:
        classes = sorted({name.split("_")[0] for name in file_names})
        index = {c: i for i, c in enumerate(classes)}
        for name in file_names:
            cls = name.split("_")[0]
            write(root / "train" / cls / name, index[cls])
        for cls in classes:
            for i in range(val_per_class):
                write(root / "val" / cls / f"ILSVRC2012_val_{index[cls]:04d}{i:04d}.JPEG", index[cls])
        return root
    for label in range(num_classes):
        cls = wnid(label)
        for i in range(per_class):
            write(root / "train" / cls / f"{cls}_{i + 1}.JPEG", label)
        for i in range(val_per_class):
            write(root / "val" / cls / f"ILSVRC2012_val_{label:04d}{i:04d}.JPEG", label)
    return root
