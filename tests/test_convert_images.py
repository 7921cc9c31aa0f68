"""`paws convert-dataset images|arrays`: your own images or arrays into the array format (issue 13, point 1).

Real image files are written with PIL in the test (PNG, JPEG, BMP; grayscale and RGB; two sizes), converted, and
the arrays read back are compared with the pixels written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from data_tools.convert_images import carve_test_split, convert_arrays, convert_images
from paws_cli.cli import app
from paws_cli.data.datasets.arrays import load_array_dataset


def gray(value: int, size: int = 12) -> np.ndarray:
    """A grayscale image whose pixels encode ``value`` (a gradient offset), so files can be told apart."""
    ramp = np.add.outer(np.arange(size), np.arange(size)).astype(np.int64)
    return ((ramp * 3 + value) % 256).astype(np.uint8)


def write(path: Path, array: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def make_folder(root: Path, classes: dict[str, list[tuple[str, np.ndarray]]]) -> Path:
    for name, files in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for file, array in files:
            write(root / name / file, array)
    return root


def test_png_jpeg_bmp_grayscale_folder_round_trips(tmp_path: Path) -> None:
    pngs = {f"{i}.png": gray(10 * i) for i in range(5)}
    src = make_folder(
        tmp_path / "digits" / "train",
        {
            "seven": [(n, a) for n, a in pngs.items()],
            "three": [("a.bmp", gray(200)), ("b.bmp", gray(201)), ("c.png", gray(202)), ("d.png", gray(203))],
        },
    )
    write(src / "seven" / "notes.txt", np.zeros((2, 2), np.uint8), fmt="PNG")  # an image named .txt: ignored
    (src / "seven" / "README").write_text("not an image")
    test = make_folder(
        tmp_path / "digits" / "test", {"seven": [("t.png", gray(77))], "three": [("t.bmp", gray(99))]}
    )

    result = convert_images(src, tmp_path / "out", test_dir=test)

    ds = load_array_dataset(tmp_path / "out", verify_hash=True)
    assert ds.class_names == ["seven", "three"]  # folder names, sorted
    assert ds.name == "digits"  # SRC is called train: the parent's name
    assert ds.image_shape == (12, 12)  # grayscale: one channel
    assert len(ds.train_labels) == 9 and len(ds.test_labels) == 2
    # Every stored image is exactly a written file's pixels (lossless formats), with its folder's label.
    expected = {
        (label, gray(v).tobytes())
        for label, vs in ((0, [0, 10, 20, 30, 40]), (1, [200, 201, 202, 203]))
        for v in vs
    }
    stored = {(int(y), x.tobytes()) for x, y in zip(ds.train_images, ds.train_labels, strict=True)}
    assert stored == expected
    assert {(int(y), x.tobytes()) for x, y in zip(ds.test_images, ds.test_labels, strict=True)} == {
        (0, gray(77).tobytes()),
        (1, gray(99).tobytes()),
    }
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["conversion"]["test_split"] == f"folder {test.resolve()}"
    assert any("ignored 2 file(s) that are not images" in note for note in result.notes)


def test_jpeg_and_rgb_mixed_with_grayscale_become_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)
    src = make_folder(
        tmp_path / "src", {"a": [("c.png", colour), ("g.png", gray(5, 10))], "b": [("g.png", gray(9, 10))]}
    )
    write(src / "b" / "photo.jpg", colour, fmt="JPEG")

    result = convert_images(src, tmp_path / "out", test_fraction=0.5)

    ds = load_array_dataset(tmp_path / "out")
    assert ds.image_shape == (10, 10, 3)
    assert any("2 grayscale image(s) converted to RGB" in note for note in result.notes)
    images = np.concatenate([ds.train_images, ds.test_images])
    assert any((x == colour).all() for x in images)  # the PNG's colours are kept exactly
    assert any((x == np.repeat(gray(5, 10)[..., None], 3, axis=2)).all() for x in images)


def test_rgb_files_with_equal_channels_are_stored_as_grayscale(tmp_path: Path) -> None:
    as_rgb = lambda v: np.repeat(gray(v)[..., None], 3, axis=2)  # noqa: E731
    src = make_folder(
        tmp_path / "src",
        {"a": [(f"{i}.png", as_rgb(i)) for i in range(3)], "b": [("0.png", gray(50)), ("1.png", gray(51))]},
    )
    result = convert_images(src, tmp_path / "out", test_fraction=0.4)
    assert load_array_dataset(tmp_path / "out").image_shape == (12, 12)
    assert any("three equal channels: stored as grayscale" in note for note in result.notes)


def test_two_sizes_are_refused_with_the_option_then_resized(tmp_path: Path) -> None:
    src = make_folder(
        tmp_path / "src",
        {
            "a": [(f"{i}.png", gray(i, 20)) for i in range(3)] + [("big.png", gray(1, 28))],
            "b": [(f"{i}.png", gray(i, 20)) for i in range(3)],
        },
    )
    with pytest.raises(ValueError) as err:
        convert_images(src, tmp_path / "out")
    message = str(err.value)
    assert (
        "2 different sizes" in message
        and "20x20 px: 6 image(s)" in message
        and "28x28 px: 1 image(s)" in message
    )
    assert "a/big.png" in message and "--size 20" in message
    assert not (tmp_path / "out").exists()  # nothing written

    result = convert_images(src, tmp_path / "out", size=20, test_fraction=0.3)
    ds = load_array_dataset(tmp_path / "out")
    assert ds.image_shape == (20, 20)
    assert any("resized 1 of 7 images to 20x20 px (Pillow LANCZOS" in note for note in result.notes)
    # The 20-px images are stored untouched; the big one is a resampled 20x20 image.
    stored = [x.tobytes() for x in np.concatenate([ds.train_images, ds.test_images])]
    assert sum(x in stored for x in (gray(i, 20).tobytes() for i in range(3))) == 3


def test_empty_class_and_unreadable_file_are_named(tmp_path: Path) -> None:
    src = make_folder(
        tmp_path / "src",
        {"a": [("0.png", gray(0)), ("1.png", gray(1))], "b": [("0.png", gray(2)), ("1.png", gray(3))]},
    )
    (src / "empty").mkdir()
    with pytest.raises(ValueError, match=r"1 class folder\(s\) of SRC .* hold no images: .*empty"):
        convert_images(src, tmp_path / "out")
    (src / "empty").rmdir()
    (src / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError) as err:
        convert_images(src, tmp_path / "out")
    assert "broken.png" in str(err.value) and "--on-bad-file skip" in str(err.value)
    result = convert_images(src, tmp_path / "out", on_bad_file="skip", test_fraction=0.5)
    assert any("skipped 1 unreadable file(s)" in n and "broken.png" in n for n in result.notes)
    assert load_array_dataset(tmp_path / "out").meta["conversion"]["skipped_files"] == [
        str(src / "b" / "broken.png")
    ]


def test_folder_layout_errors(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    write(flat / "0.png", gray(0))
    with pytest.raises(FileNotFoundError, match=r"no class folders \(it holds images directly"):
        convert_images(flat, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_images(tmp_path / "nowhere", tmp_path / "out")
    src = make_folder(tmp_path / "src", {"a": [("0.png", gray(0))], "b": [("0.png", gray(1))]})
    test = make_folder(tmp_path / "test", {"a": [("0.png", gray(0))], "zebra": [("0.png", gray(1))]})
    with pytest.raises(ValueError, match=r"class folder\(s\) that the training folder lacks: zebra"):
        convert_images(src, tmp_path / "out", test_dir=test)
    with pytest.raises(ValueError, match="class 'a' has 1 image"):
        convert_images(src, tmp_path / "out")  # nothing to hold out a test image from


def test_carved_test_split_is_seeded_stratified_and_disjoint() -> None:
    labels = np.repeat(np.arange(3), [10, 20, 5])
    train, test = carve_test_split(labels, 0.2, seed=1, class_names=["a", "b", "c"])
    assert np.bincount(labels[test]).tolist() == [2, 4, 1]
    assert sorted([*train, *test]) == list(range(35))
    again = carve_test_split(labels, 0.2, seed=1, class_names=["a", "b", "c"])
    other = carve_test_split(labels, 0.2, seed=2, class_names=["a", "b", "c"])
    assert (again[1] == test).all() and not (other[1] == test).all()
    with pytest.raises(ValueError, match="between 0 and 1"):
        carve_test_split(labels, 1.0, seed=1, class_names=["a", "b", "c"])


def test_npz_arrays_with_and_without_a_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    y = np.repeat([3, 5, 9, 11], 10)  # not 0..K-1: numbered in order, the values kept as names
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    result = convert_arrays(tmp_path / "d.npz", tmp_path / "a")
    ds = load_array_dataset(tmp_path / "a")
    assert ds.class_names == ["3", "5", "9", "11"] and ds.name == "d"
    assert len(ds.test_labels) == 8 and np.bincount(ds.test_labels).tolist() == [2, 2, 2, 2]
    assert any("numbered 0..3" in n for n in result.notes)
    # stored pairs are the given pairs
    lookup = {img.tobytes(): lab for img, lab in zip(x, y, strict=True)}
    for img, code in zip(ds.train_images, ds.train_labels, strict=True):
        assert ds.class_names[code] == str(lookup[img.tobytes()])

    colour = rng.integers(0, 256, (6, 3, 8, 8), dtype=np.int64)  # channels first, int64 in range
    np.savez(
        tmp_path / "c.npz",
        x_train=colour,
        y_train=np.array([0, 1, 0, 1, 0, 1]),
        x_test=colour[:2],
        y_test=np.array([0, 1]),
        class_names=np.array(["cat", "dog"]),
    )
    result = convert_arrays(tmp_path / "c.npz", tmp_path / "c")
    ds = load_array_dataset(tmp_path / "c")
    assert ds.image_shape == (8, 8, 3) and ds.class_names == ["cat", "dog"]
    assert (ds.train_images == np.moveaxis(colour, 1, -1).astype(np.uint8)).all()
    assert any("channels-first" in n for n in result.notes)


def test_npz_errors_say_what_to_do(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "f.npz", x_train=np.random.default_rng(0).random((4, 8, 8)), y_train=np.array([0, 1, 0, 1])
    )
    with pytest.raises(ValueError, match=r"float64 values .*np.rint\(x \* 255\)"):
        convert_arrays(tmp_path / "f.npz", tmp_path / "o")
    np.savez(tmp_path / "m.npz", x_train=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"lacks \['y_train'\]"):
        convert_arrays(tmp_path / "m.npz", tmp_path / "o")
    np.savez(tmp_path / "n.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="4 images but y_train has 3 labels"):
        convert_arrays(tmp_path / "n.npz", tmp_path / "o")


def test_cli_prints_the_dataset_and_the_next_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_folder(
        tmp_path / "src", {c: [(f"{i}.png", gray(i + 40 * k)) for i in range(5)] for k, c in enumerate("xyz")}
    )
    result = CliRunner().invoke(app, ["convert-dataset", "images", "src", "data/mine"])
    assert result.exit_code == 0, result.output
    assert (
        "wrote data/mine: 12 train / 3 test images, 3 classes (x, y, z), 12x12 px grayscale (1 channel)"
        in result.output
    )
    assert "next: paws demo --recipe fmnist_demo data.path=data/mine" in result.output
    bad = CliRunner().invoke(app, ["convert-dataset", "images", "nowhere", "data/x"])
    assert bad.exit_code == 2 and "error:" in bad.output and "nowhere does not exist" in bad.output
    np.savez(tmp_path / "a.npz", x_train=np.zeros((4, 6, 6), np.uint8), y_train=np.array([0, 1, 0, 1]))
    arrays = CliRunner().invoke(
        app, ["convert-dataset", "arrays", "a.npz", "data/arr", "--test-fraction", "0.5"]
    )
    assert arrays.exit_code == 0, arrays.output
    assert "2 train / 2 test images, 2 classes (0, 1), 6x6 px" in arrays.output
