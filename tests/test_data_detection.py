"""`data.path=DIR` alone is enough (issue 13, points 2-4 and 7): the kind of data is read from the path and
recorded truthfully; paths are recorded absolute; views are checked against (or sized from) the images; the
data-loading default fits the machine; knn-eval says when k is larger than the labelled images per class.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paws_cli.config import ConfigError, load_settings
from paws_cli.config.paths import with_absolute_paths
from paws_cli.config.schema import default_num_workers
from paws_cli.data.backends.memory import load_dataset
from paws_cli.data.datasets.arrays import write_array_dataset
from paws_cli.data.view_sizes import fit_views
from paws_cli.eval.knn_eval import knn_k_warnings

NO_ENV: dict[str, str] = {}


def array_dataset(root: Path, name: str = "digits", side: int = 20) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, side, side), dtype=np.uint8)
    y = np.arange(12) % 3
    write_array_dataset(root, name, (x, y), (x[:3], y[:3]), ["a", "b", "c"], "test")
    return root


def image_folder(root: Path) -> Path:
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / c / "0.png")
    return root


def kind(overrides: list[str], environ: dict[str, str] | None = None) -> tuple[str, str]:
    s = load_settings("fmnist_demo", overrides, environ=NO_ENV if environ is None else environ)
    return s.data.dataset, s.data.format


def test_the_kind_is_read_from_data_path(tmp_path: Path) -> None:
    arrays = array_dataset(tmp_path / "arrays")
    assert kind([f"data.path={arrays}"]) == ("array", "memory")  # the recipe says fashion_mnist
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    (cifar / "data_batch_1").write_bytes(b"")
    (cifar / "test_batch").write_bytes(b"")
    assert kind([f"data.path={cifar}"]) == ("cifar10", "memory")
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"")
    assert kind([f"data.path={beton}"]) == ("imagefolder", "ffcv")
    assert kind([f"data.path={image_folder(tmp_path / 'folder')}"]) == ("imagefolder", "folder")
    # the recipe's kind stays where the path does not exist (yet): its loader says how to make one
    assert kind([f"data.path={tmp_path / 'later'}"]) == ("fashion_mnist", "memory")
    # an ImageNet recipe given an array dataset trains on it in memory
    s = load_settings("r50_10pct", [f"data.path={arrays}"], environ=NO_ENV)
    assert (s.data.dataset, s.data.format) == ("array", "memory")


def test_an_explicit_kind_that_contradicts_the_path_is_an_error(tmp_path: Path) -> None:
    arrays = array_dataset(tmp_path / "arrays")
    assert kind(["data.dataset=array", f"data.path={arrays}"]) == ("array", "memory")
    with pytest.raises(ConfigError) as err:
        kind(["data.dataset=cifar10", f"data.path={arrays}"])
    message = str(err.value)
    assert "data.dataset=cifar10 [from override 'data.dataset=cifar10']" in message
    assert "an array dataset" in message and "data.dataset=array" in message
    with pytest.raises(
        ConfigError, match=r"data.format=folder \[from environment variable PAWS_DATA__FORMAT\]"
    ):
        kind([f"data.path={arrays}"], environ={"PAWS_DATA__FORMAT": "folder"})
    # Fashion-MNIST converted with `paws convert-dataset fashion-mnist` may be called so; another dataset not
    fmnist = array_dataset(tmp_path / "fmnist", name="fashion-mnist")
    assert kind(["data.dataset=fashion_mnist", f"data.path={fmnist}"]) == ("fashion_mnist", "memory")
    with pytest.raises(ConfigError, match=r"data\.dataset=fashion_mnist"):
        kind(["data.dataset=fashion_mnist", f"data.path={arrays}"])


def test_paths_that_need_converting_say_how(tmp_path: Path) -> None:
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0, 1]))
    with pytest.raises(ConfigError, match=rf"convert it first with `paws convert-dataset arrays {npz} OUT`"):
        kind([f"data.path={npz}"])
    image_folder(tmp_path / "split" / "train")
    image_folder(tmp_path / "split" / "test")
    with pytest.raises(ConfigError, match=r"paws convert-dataset images .*split/test"):
        kind([f"data.path={tmp_path / 'split'}"])
    missing = load_settings("fmnist_demo", [f"data.path={tmp_path / 'mine'}"], environ=NO_ENV)
    with pytest.raises(
        FileNotFoundError, match=r"mine does not exist; make one with `paws convert-dataset images SRC"
    ):
        load_dataset(missing.data)


def test_paths_are_made_absolute_when_they_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    array_dataset(tmp_path / "data" / "mine")
    (tmp_path / "labelled.txt").write_text("0\n")
    s = load_settings(
        "fmnist_demo",
        ["data.path=data/mine", "data.split=labelled.txt", "finetune.val_split=official:1%"],
        environ=NO_ENV,
    )
    fixed = with_absolute_paths(s)
    assert fixed.data.path == str(tmp_path / "data" / "mine")
    assert fixed.data.split == str(tmp_path / "labelled.txt")
    assert fixed.data.cache_dir == str(tmp_path / "data")  # an output folder: absolute even before it exists
    assert fixed.finetune.val_split == "official:1%"  # a name, not a file
    assert fixed.run.out_dir == "runs"  # new runs go where the command runs


def test_views_are_sized_from_the_data_or_a_warning_names_the_overrides(tmp_path: Path) -> None:
    arrays = array_dataset(tmp_path / "arrays", side=20)
    sized, notes = fit_views(load_settings("fmnist_demo", [f"data.path={arrays}"], environ=NO_ENV))
    assert (sized.augment.large_size, sized.augment.small_size) == (20, 11)  # 16/28 of 20, rounded
    assert "the images are 20x20 px, so the large views are 20 px and the small ones 11 px" in notes[0]
    # explicit sizes turn size_from_data off: then a warning says what to pass
    given = load_settings("fmnist_demo", [f"data.path={arrays}", "augment.small_size=12"], environ=NO_ENV)
    assert not given.augment.size_from_data
    kept, notes = fit_views(given)
    assert (kept.augment.large_size, kept.augment.small_size) == (28, 12)
    assert len(notes) == 1 and notes[0].startswith("warning: the images are 20x20 px but the views are 28 px")
    assert "pass augment.large_size=20 augment.small_size=9" in notes[0]  # 12/28 of 20
    # matching sizes: nothing to say; Fashion-MNIST keeps the recipe's 28 and 16
    fmnist, notes = fit_views(load_settings("fmnist_demo", [], environ=NO_ENV))
    assert notes == [] and (fmnist.augment.large_size, fmnist.augment.small_size) == (28, 16)
    folder = load_settings("fmnist_demo", [f"data.path={image_folder(tmp_path / 'f')}"], environ=NO_ENV)
    _, notes = fit_views(folder)
    assert notes and "has no effect" in notes[0]


def test_num_workers_default_fits_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == max(1, min(8, cores))
    assert load_settings("fmnist_demo", [], environ=NO_ENV).data.num_workers == max(1, min(8, cores))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))  # more processes than cores on the node
    assert default_num_workers() == 1
    assert load_settings("fmnist_demo", ["data.num_workers=3"], environ=NO_ENV).data.num_workers == 3


def test_knn_k_larger_than_the_labelled_images_per_class_is_named() -> None:
    bank = np.repeat(np.arange(10), 10)
    assert knn_k_warnings(10, bank, 10) == []
    (warning,) = knn_k_warnings(20, bank, 10)
    assert (
        "eval.knn_k=20 exceeds the labelled images per class (10)" in warning and "eval.knn_k=10" in warning
    )
    uneven = np.array([0, 0, 0, 1, 1, 2])
    warnings = knn_k_warnings(8, uneven, 3)
    assert "exceeds the 6 labelled images of the bank: k-NN uses k=6" in warnings[0]
    assert "(1 to 3)" in warnings[1]


def test_the_folder_back_end_names_image_files_not_jpegs(tmp_path: Path) -> None:
    import torch

    from paws_cli.data.sources import build_train_data

    root = image_folder(tmp_path / "pngs")
    for c in ("cat", "dog"):
        Image.fromarray(np.full((8, 8), 9, np.uint8)).save(root / c / "1.png")
    settings = load_settings(
        "fmnist_demo",
        [f"data.path={root}", "data.num_workers=0", "data.labels_per_class=1", "paws.classes_per_batch=2",
         "paws.images_per_class=1", "optim.batch_size=2"],
        environ=NO_ENV,
    )  # fmt: skip
    assert (settings.data.dataset, settings.data.format) == ("imagefolder", "folder")
    line = build_train_data(settings, device=torch.device("cpu")).describe()
    assert "image files decoded by PIL in 0 DataLoader workers" in line and "JPEG" not in line


def test_the_demo_fits_any_in_memory_dataset(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from paws_cli.demo import fit_to_dataset, short_schedule_note

    arrays = array_dataset(tmp_path / "arrays")  # 3 classes, 12 training images
    out = io.StringIO()
    extra, dataset = fit_to_dataset(
        ["fmnist_demo", "semppl_fmnist_demo"], [f"data.path={arrays}", "supervised.classes_per_batch=2"],
        Console(file=out, soft_wrap=True),
    )  # fmt: skip
    assert dataset.name == "digits"
    # the recipes ask for 10 labelled classes per step; the one the user gave is left alone
    assert extra == ["paws.classes_per_batch=3", "semppl.labelled_batch.classes_per_batch=3"]
    assert "digits has 3 classes" in out.getvalue()
    # 2.5 epochs of 12 images are 0 steps: the warning gives the recipe's Fashion-MNIST compute in steps
    assert "optim.total_steps=2342 optim.warmup_steps=187" in out.getvalue()
    with pytest.raises(ValueError, match=r"paws demo runs on in-memory data.*paws convert-dataset images"):
        fit_to_dataset(
            ["fmnist_demo"], [f"data.path={image_folder(tmp_path / 'f')}"], Console(file=io.StringIO())
        )
    fmnist = load_settings("fmnist_demo", [], environ=NO_ENV)
    assert short_schedule_note(fmnist, 60000) is None  # 2342 steps
    note = short_schedule_note(fmnist, 5000)
    assert note is not None and "2.5 epochs of 5000 training images are only 195 steps" in note
