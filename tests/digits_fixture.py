"""A folder of generated digit images, as a user's own dataset would be: ``train/<digit>/*.png`` (and ``test/``).

Each image is a digit drawn with one of the fonts matplotlib ships (DejaVu, STIX, Computer Modern), at a random
size, rotation, stroke width and position, with noise: a learnable task that is not trivial (raw pixels do
clearly worse than a trained network). ``python tests/digits_fixture.py OUT`` writes the README's example
(500 training and 100 test images per digit, 20x20 px grayscale PNGs).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_NAMES = ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono", "STIXGeneral", "cmr10", "cmss10", "cmtt10")
STYLES = ("", "-Bold", "-Oblique", "-Italic", "-BoldOblique", "-BoldItalic", "Bol", "Italic", "BolIta")


@lru_cache(maxsize=1)
def font_files() -> tuple[Path, ...]:
    """The digit-capable TrueType fonts shipped with matplotlib."""
    import matplotlib

    folder = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    found = [folder / f"{n}{s}.ttf" for n in FONT_NAMES for s in STYLES if (folder / f"{n}{s}.ttf").is_file()]
    return tuple(found)


def render_digit(digit: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (size, size) image of ``digit``: white strokes on black, jittered and noisy."""
    fonts = font_files()
    font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(36, 52)))
    canvas = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(canvas).text((32, 32), str(digit), fill=255, font=font, anchor="mm")
    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.MaxFilter(3))  # a thicker stroke
    canvas = canvas.rotate(float(rng.uniform(-18, 18)), resample=Image.Resampling.BILINEAR)
    box = canvas.getbbox() or (0, 0, 64, 64)
    glyph = canvas.crop(box)
    scale = rng.uniform(0.55, 0.85) * size / max(glyph.size)
    glyph = glyph.resize(
        (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.Resampling.LANCZOS
    )
    out = Image.new("L", (size, size), 0)
    x = int(rng.integers(0, size - glyph.width + 1))
    y = int(rng.integers(0, size - glyph.height + 1))
    out.paste(glyph, (x, y))
    pixels = np.asarray(out, dtype=np.float64) + rng.normal(0, 18, (size, size))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_digit_folder(
    root: str | Path,
    *,
    per_class: int,
    test_per_class: int = 0,
    classes: int = 10,
    sizes: Sequence[int] = (20,),
    seed: int = 0,
) -> Path:
    """Write ``root/train/<d>/NNNN.png`` (and ``root/test/...``); image i of a class has size sizes[i % n]."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for digit in range(classes) if count else ():
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = render_digit(digit, sizes[i % len(sizes)], rng)
                Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


if __name__ == "__main__":
    make_digit_folder(sys.argv[1], per_class=500, test_per_class=100)
