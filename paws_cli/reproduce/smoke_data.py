"""A tiny ImageNet-layout folder of real JPEGs for ``paws reproduce --scale smoke``.

The smoke run must go through exactly the steps of the real one, official split lists included, so its train
folder holds, for a few ImageNet classes, every file the official 10% list and the held-out ``val.txt`` name
for those classes (the 1% list is a subset of the 10% one); ``make-splits --dataset-classes-only`` then keeps
exactly these classes. Each class is one of the photos scikit-image ships; its images are seeded random crops
of it (position, scale, aspect ratio, brightness), resized to small ImageNet-like sizes (a third of them
portrait) and saved as JPEG. ``val/<class>/`` gets a few more crops as the evaluation queries.

The same idea as the test suite's ``tests/imagefolder_fixture.py``, kept in the package because ``make`` users
do not import tests. scikit-image (a dev dependency) provides the photos; it is imported only here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from paws_cli.data.splits.files import imagenet_class_of, official_split

#: scikit-image photos used as classes, one per class (colour ones first).
PHOTOS: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")
#: Written last, so a folder with this file is complete (an interrupted generation is redone).
MARKER = "smoke_data.json"


def _load_photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as exc:
        raise ValueError(
            "the smoke run makes its images from scikit-image's sample photos, but scikit-image is not "
            f"installed ({exc}); install it with `pip install scikit-image` (it is in the dev extra: "
            "`pip install -e '.[dev]'`)"
        ) from None
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def _crop_writer(seed: int, size: tuple[int, int], quality: int) -> Callable[[Path, np.ndarray], None]:
    """A function writing one seeded random crop of a photo as a JPEG (the seed makes the folder reproducible)."""
    rng = np.random.default_rng(seed)

    def write(path: Path, photo: np.ndarray) -> None:
        h, w = photo.shape[:2]
        scale, ratio = rng.uniform(0.35, 1.0), rng.uniform(3 / 4, 4 / 3)
        ch = max(16, min(h, int(h * scale / np.sqrt(ratio))))
        cw = max(16, min(w, int(w * scale * np.sqrt(ratio))))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = photo[y : y + ch, x : x + cw].astype(np.float32) * rng.uniform(0.8, 1.2)
        out_w, out_h = (max(8, int(s * rng.uniform(0.8, 1.2))) for s in size)
        if rng.random() < 1 / 3:
            out_w, out_h = out_h, out_w
        image = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
        path.parent.mkdir(parents=True, exist_ok=True)
        image.resize((out_w, out_h), Image.BILINEAR).save(path, format="JPEG", quality=quality)

    return write


def smoke_file_names(num_classes: int) -> dict[str, list[str]]:
    """The official training-file names of the first ``num_classes`` ImageNet classes: {class: [names]}.

    Every name of the 10% list (which contains the 1% list) and of val.txt for those classes, so both official
    labelled lists and the held-out list resolve on the smoke folder.
    """
    if not 1 <= num_classes <= len(PHOTOS):
        raise ValueError(
            f"the smoke folder has 1 to {len(PHOTOS)} classes (one photo each), got {num_classes}"
        )
    names = [*official_split("10%").ids, *official_split("val").ids]
    by_class: dict[str, list[str]] = {}
    for name in names:
        by_class.setdefault(imagenet_class_of(str(name)), []).append(str(name))
    classes = sorted(by_class)[:num_classes]
    return {c: sorted(by_class[c]) for c in classes}


def make_smoke_imagenet(
    root: str | Path,
    *,
    num_classes: int = 4,
    val_per_class: int = 5,
    size: tuple[int, int] = (48, 36),
    quality: int = 90,
    seed: int = 0,
) -> Path:
    """Write ``root/train/<wnid>/<official name>`` and ``root/val/<wnid>/ILSVRC2012_val_*.JPEG``; return root.

    Idempotent: a complete folder (its marker file records the same arguments) is left as it is; otherwise
    ``root/train`` and ``root/val`` are removed and written again (``root`` is the smoke run's own folder).
    """
    root = Path(root)
    params = {
        "num_classes": num_classes,
        "val_per_class": val_per_class,
        "size": list(size),
        "quality": quality,
        "seed": seed,
    }
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("params") == params:
                return root
        except json.JSONDecodeError:
            pass  # a damaged marker: regenerate below
    files = smoke_file_names(num_classes)
    for part in ("train", "val"):  # a partial or different earlier folder: start afresh (we made it)
        if (root / part).is_dir():
            shutil.rmtree(root / part)
    write = _crop_writer(seed, size, quality)
    count = 0
    for label, (wnid, names) in enumerate(files.items()):
        photo = _load_photo(PHOTOS[label])
        for name in names:
            write(root / "train" / wnid / name, photo)
        for i in range(val_per_class):
            write(root / "val" / wnid / f"ILSVRC2012_val_{label:04d}{i:04d}.JPEG", photo)
        count += len(names) + val_per_class
    doc = {
        "params": params,
        "classes": list(files),
        "images": count,
        "made_by": "paws reproduce --scale smoke",
    }
    marker.write_text(json.dumps(doc, indent=1) + "\n")
    return root
