"""`paws convert-dataset`: images, arrays, fashion-mnist and imagefolder (registered by cli.py).

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
from rich.table import Table

from data_tools.convert_images import DEFAULT_TEST_FRACTION, Converted

#: Where the commands print (set by :func:`register` to the CLI's console).
console = Console(soft_wrap=True)
err_console = Console(stderr=True)

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


def convert_fashion_mnist_cmd(
    out: Annotated[Path, typer.Argument(help="Output directory of the converted dataset.")],
    root: Annotated[
        Path | None, typer.Option(help="Folder with the raw files (default: Debian's dataset-fashion-mnist).")
    ] = None,
) -> None:
    """Convert Fashion-MNIST into the toolkit's on-disk array format."""
    from data_tools.convert import convert_dataset as convert
    from paws_cli.data.datasets.arrays import load_array_dataset

    path = convert("fashion-mnist", out, root)
    ds = load_array_dataset(path)
    console.print(
        f"wrote {path}: {len(ds.train_labels)} train / {len(ds.test_labels)} test images, {ds.num_classes} classes, "
        f"mean {[round(m, 4) for m in ds.mean]} std {[round(s, 4) for s in ds.std]}"
    )


def convert_imagefolder_cmd(
    src: Annotated[
        Path, typer.Argument(help="ImageFolder root: one folder per class (e.g. imagenet/train).")
    ],
    out: Annotated[
        Path,
        typer.Argument(
            help="Output .beton; its sidecar index OUT.beton.index.json (e.g. train.beton.index.json) goes beside it."
        ),
    ],
    max_resolution: Annotated[
        int, typer.Option(help="Longer side of the stored images (FFCV RGBImageField); 0 keeps every size.")
    ] = 512,
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality of re-encoded images (1-100).")] = 90,
    write_mode: Annotated[
        str,
        typer.Option(
            help="raw (pixels), jpg (JPEG), smart (JPEG above --smart-threshold raw bytes, else raw) or "
            "proportion (JPEG with --compress-probability)."
        ),
    ] = "jpg",
    compress_probability: Annotated[
        float, typer.Option(help="write-mode proportion: probability that an image is stored as JPEG.")
    ] = 0.5,
    smart_threshold: Annotated[
        int | None,
        typer.Option(
            help="write-mode smart: raw bytes above which an image is stored as JPEG (default 196608)."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes for checking and writing (default: all cores).")
    ] = None,
    on_bad_file: Annotated[
        str,
        typer.Option(
            help="Unreadable image: skip (listed in the report and the index) or stop with an error."
        ),
    ] = "skip",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT and its index.")] = False,
) -> None:
    """Convert an ImageFolder (ImageNet layout) into an FFCV .beton plus its sidecar index."""
    from data_tools.convert_imagefolder import convert_imagefolder

    result = convert_imagefolder(
        src,
        out,
        max_resolution=max_resolution,
        jpeg_quality=jpeg_quality,
        write_mode=write_mode,
        compress_probability=compress_probability,
        smart_threshold=smart_threshold,
        workers=workers,
        on_bad_file=on_bad_file,
        overwrite=overwrite,
        progress=True,
        console=err_console,  # the progress bar goes to stderr
    )
    console.print(
        f"wrote {result.beton}: {result.num_images} images, {len(result.classes)} classes, "
        f"{result.beton_bytes / 2**20:.1f} MiB (write mode {write_mode}, max side {max_resolution or 'kept'}) "
        f"in {result.seconds:.1f} s; index {result.sidecar}",
        markup=False,  # file names may hold [brackets]
    )
    if result.skipped:
        from rich.text import Text

        table = Table("skipped file", "reason", title=f"{len(result.skipped)} unreadable file(s) skipped")
        for entry in result.skipped[:20]:
            table.add_row(Text(entry["file"]), Text(entry["reason"]))
        console.print(table)
        if len(result.skipped) > 20:
            console.print(
                f"... and {len(result.skipped) - 20} more; all are listed under 'skipped' in the index"
            )


def register(convert_app: typer.Typer, user_errors: Callable[[Any], Any], out: Console, err: Console) -> None:
    """Add the `convert-dataset` commands to its sub-app; they print to ``out`` (progress bars to ``err``)."""
    global console, err_console
    console, err_console = out, err
    convert_app.command("fashion-mnist")(user_errors(convert_fashion_mnist_cmd))
    convert_app.command("imagefolder")(user_errors(convert_imagefolder_cmd))
    convert_app.command("images", help=IMAGES_HELP)(user_errors(convert_images_cmd))
    convert_app.command("arrays", help=ARRAYS_HELP)(user_errors(convert_arrays_cmd))
