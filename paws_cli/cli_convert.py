"""`paws convert-dataset images|arrays`: your own data into the in-memory array format (registered by cli.py).

The conversion itself is :mod:`data_tools.convert_images`; this module reads the options and prints the report:
what was written (images, classes, size, channels, where the test split came from), every note of the
conversion, and the next command to run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from data_tools.convert_images import DEFAULT_TEST_FRACTION, Converted

#: Where the commands print (set by :func:`register` to the CLI's console).
console = Console(soft_wrap=True)

IMAGES_HELP = (
    "Your own images, one sub-folder per class (PNG, JPEG, BMP, ...), into the in-memory array format.\n\n"
    "The fast path for data that fits in memory. Grayscale or colour images of one size (several sizes are an "
    "error listing them, unless --size N resizes them); class names are the folder names; the test split is "
    "--test-dir, or a seeded --test-fraction of each class held out. Empty class folders and unreadable files "
    "are errors that name them."
)
ARRAYS_HELP = (
    "Numpy arrays (an .npz of x_train, y_train[, x_test, y_test][, class_names]) into the in-memory array "
    "format.\n\n"
    "Images: uint8 (N, H, W) or (N, H, W, 3) (channels-first is transposed); labels: integers or strings. "
    "Without x_test, a seeded --test-fraction of each class is held out as the test split."
)

TestFraction = Annotated[
    float,
    typer.Option(
        help="Without a test split of your own: the share of each class's images held out as the test split "
        "(seeded by --seed; never trained on)."
    ),
]
Seed = Annotated[
    int, typer.Option(help="Seed of the held-out test images (without a test split of your own).")
]
Name = Annotated[str | None, typer.Option(help="Dataset name in meta.json (default: the source's name).")]


def _shown_classes(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def report(result: Converted, console: Console) -> None:
    """Print what a conversion wrote, its notes and the command that runs the demo on it."""
    meta = result.meta
    shape = meta["image_shape"]
    channels = "grayscale (1 channel)" if len(shape) == 2 else f"colour ({shape[2]} channels)"
    counts = meta["counts"]
    console.print(
        f"wrote {result.out}: {counts['train']} train / {counts['test']} test images, {meta['num_classes']} "
        f"classes ({_shown_classes(meta['class_names'])}), {shape[1]}x{shape[0]} px {channels}; test split: "
        f"{meta['conversion']['test_split']}",
        markup=False,
        highlight=False,
    )
    for note in result.notes:
        console.print(f"  note: {note}", markup=False, highlight=False)
    console.print(
        f"next: paws demo --recipe fmnist_demo data.path={result.out}  (PAWS against training on your labels "
        "alone; the views are sized from the images)",
        markup=False,
        highlight=False,
    )


def convert_images_cmd(
    src: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class (its name).")],
    out: Annotated[Path, typer.Argument(help="Output directory of the array dataset (data.path=OUT).")],
    test_dir: Annotated[
        Path | None,
        typer.Option(help="Test images in the same layout (class folders named as in SRC)."),
    ] = None,
    test_fraction: TestFraction = DEFAULT_TEST_FRACTION,
    seed: Seed = 0,
    size: Annotated[
        int | None,
        typer.Option(
            help="Resize every image to SIZE x SIZE px (Pillow LANCZOS; needed when the images have several "
            "sizes, which is otherwise an error listing them)."
        ),
    ] = None,
    on_bad_file: Annotated[
        str,
        typer.Option(help="An image file that cannot be read: stop (an error naming it) or skip (listed)."),
    ] = "stop",
    name: Name = None,
) -> None:
    """Your own images, one sub-folder per class, into the in-memory array format (help: IMAGES_HELP)."""
    from data_tools.convert_images import convert_images

    result = convert_images(
        src,
        out,
        test_dir=test_dir,
        test_fraction=test_fraction,
        seed=seed,
        size=size,
        on_bad_file=on_bad_file,  # type: ignore[arg-type]  # checked by convert_images
        name=name,
    )
    report(result, console)


def convert_arrays_cmd(
    npz: Annotated[
        Path, typer.Argument(help="An .npz with x_train, y_train and optionally x_test, y_test, class_names.")
    ],
    out: Annotated[Path, typer.Argument(help="Output directory of the array dataset (data.path=OUT).")],
    test_fraction: TestFraction = DEFAULT_TEST_FRACTION,
    seed: Seed = 0,
    name: Name = None,
) -> None:
    """Numpy arrays into the in-memory array format (help: ARRAYS_HELP)."""
    from data_tools.convert_images import convert_arrays

    report(convert_arrays(npz, out, test_fraction=test_fraction, seed=seed, name=name), console)


def register(convert_app: typer.Typer, user_errors: Callable[[Any], Any], out: Console) -> None:
    """Add the `images` and `arrays` commands to the `convert-dataset` sub-app; they print to ``out``."""
    global console
    console = out
    convert_app.command("images", help=IMAGES_HELP)(user_errors(convert_images_cmd))
    convert_app.command("arrays", help=ARRAYS_HELP)(user_errors(convert_arrays_cmd))
