"""`paws make-splits` on ImageNet-style data: official lists, draws, val.txt, .beton sidecars, the CLI.

The folder holds real JPEGs whose names come from the shipped official lists for three classes (the whole
1% and val.txt entries of those classes, plus ten other training images per class), so the official lists
resolve for real, and the 997 classes it lacks exercise the "names not in the dataset" errors.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from imagefolder_fixture import make_imagefolder
from typer.testing import CliRunner

from data_tools.make_splits import make_splits, open_dataset
from paws_cli.cli import app
from paws_cli.data.backends.sidecar import write_sidecar
from paws_cli.data.splits.files import official_split, read_split, resolve_names, split_entry_class
from paws_cli.data.splits.official import official_list

ONE = official_split("1%").ids
VAL = official_split("val").ids
CLASSES = sorted({split_entry_class(n) for n in ONE})[:3]
ONE_HERE = [n for n in ONE if split_entry_class(n) in CLASSES]
VAL_HERE = [n for n in VAL if split_entry_class(n) in CLASSES]
EXTRA = [f"{c}_{90000 + i}.JPEG" for c in CLASSES for i in range(10)]


@pytest.fixture(scope="module")
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inet") / "imagenet"
    make_imagefolder(root, file_names=ONE_HERE + VAL_HERE + EXTRA, size=(40, 32), val_per_class=1)
    return root / "train"


def _body(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if not x.startswith("#")]


def _labels_of(split_path: Path, root: Path) -> np.ndarray:
    """Per-class counts of a written split, resolved back against the dataset as the trainers do."""
    ds = open_dataset(root)
    assert ds.files is not None
    idx = resolve_names(read_split(split_path), ds.files)
    return np.bincount(ds.labels[idx], minlength=len(ds.classes))


def test_fixture_holds_the_official_names():
    assert len(ONE_HERE) == 38 and len(VAL_HERE) == 36 and CLASSES[0] == "n01440764"


def test_official_list_against_a_3_class_folder_is_an_error(train_root, tmp_path):
    with pytest.raises(ValueError) as err:
        make_splits(train_root, tmp_path / "s", official="1%")
    msg = str(err.value)
    assert "12773 of 12811 names in official list 1% are not in imagefolder dataset" in msg
    assert "997 of the split's 1000 classes have no folder" in msg and "--dataset-classes-only" in msg
    assert not (tmp_path / "s").exists()
    # Within the present classes, missing files are still an error (the 10% list needs ~128 per class).
    with pytest.raises(ValueError, match=r"347 of 385 names .* class folders exist but the files do not"):
        make_splits(train_root, tmp_path / "s", official="10%", dataset_classes_only=True)


def test_official_1pct_restricted_with_official_val(train_root, tmp_path):
    said: list[str] = []
    out = make_splits(
        train_root,
        tmp_path / "s",
        official="official:1%",
        val=True,
        dataset_classes_only=True,
        log=said.append,
    )
    assert _body(out["labelled"]) == ONE_HERE  # the official names, in the official order
    assert _body(out["val"]) == VAL_HERE
    header = read_split(out["labelled"]).header
    assert header["official"] == "1%" and header["official_sha256"] == official_list("1%").original_sha256
    assert header["dropped_names"] == "12773" and header["source"] == str(train_root.resolve())
    assert read_split(out["val"]).header["role"] == "val"
    assert any("dropped 12773 of 12811 names, from 997 classes" in m for m in said)
    assert any("dropped 11964 of 12000 names" in m for m in said)
    assert any("labelled: 38 images in 3 of 3 classes, 12-13 per class" in m for m in said)
    np.testing.assert_array_equal(_labels_of(out["labelled"], train_root), [13, 12, 13])
    np.testing.assert_array_equal(_labels_of(out["val"], train_root), [12, 12, 12])


def test_per_class_draw_is_balanced_seeded_and_avoids_official_val(train_root, tmp_path):
    kw = {"per_class": 6, "seed": 3, "val": True, "dataset_classes_only": True}
    a = make_splits(train_root, tmp_path / "a", **kw)
    b = make_splits(train_root, tmp_path / "b", **kw)
    c = make_splits(train_root, tmp_path / "c", **{**kw, "seed": 4})
    assert a["labelled"].read_bytes() == b["labelled"].read_bytes()  # deterministic
    assert _body(a["labelled"]) != _body(c["labelled"])  # seed-dependent
    np.testing.assert_array_equal(_labels_of(a["labelled"], train_root), [6, 6, 6])
    drawn = {Path(n).name for n in _body(a["labelled"])}
    assert not drawn & set(VAL_HERE)  # disjoint from the held-out list
    assert all(n.split("/")[0] in CLASSES and "/" in n for n in _body(a["labelled"]))
    assert read_split(a["labelled"]).header["disjoint_from"] == "val.txt"


def test_percent_and_val_per_class_draws(train_root, tmp_path):
    ds = open_dataset(train_root)
    sizes = np.bincount(ds.labels)  # 38 + 36 + 30 images over 3 classes
    out = make_splits(train_root, tmp_path / "p", percent=25, seed=0, val_per_class=4)
    expected = np.floor(sizes * 25 / 100 + 0.5).astype(int)  # round half up per class
    np.testing.assert_array_equal(_labels_of(out["labelled"], train_root), expected)
    np.testing.assert_array_equal(_labels_of(out["val"], train_root), [4, 4, 4])
    assert not set(_body(out["labelled"])) & set(_body(out["val"]))
    with pytest.raises(ValueError, match=r"40 asked but only 34 available.*0 = 'n01440764'"):
        make_splits(train_root, tmp_path / "x", per_class=40)


def test_dataset_root_and_bad_paths(train_root, tmp_path):
    with pytest.raises(ValueError, match=r"looks like a dataset root.*Pass .*imagenet/train"):
        make_splits(train_root.parent, tmp_path / "s", per_class=2)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        make_splits(tmp_path / "nowhere", tmp_path / "s", per_class=2)
    with pytest.raises(ValueError, match=r"not a \.beton"):
        make_splits(train_root / CLASSES[0] / EXTRA[0], tmp_path / "s", per_class=2)
    with pytest.raises(ValueError, match=r"lists integer indices, but imagefolder dataset"):
        make_splits(train_root, tmp_path / "s", official="cifar10-4000-73")
    with pytest.raises(ValueError, match=r"named like ImageNet validation images"):
        make_splits(train_root.parent / "val", tmp_path / "s", official="1%", dataset_classes_only=True)


# --------------------------------------------------------------------------- .beton via its sidecar


def _write_beton(path: Path, labels: np.ndarray) -> None:
    """A .beton of ``len(labels)`` samples: written by ffcv when importable, else just its header."""
    try:
        from ffcv.fields import IntField
        from ffcv.writer import DatasetWriter
    except ImportError:
        # ffcv's file header: version 2, field count, page size, sample count, allocation-table offset.
        path.write_bytes(struct.pack("<HHIQQ", 2, 1, 1 << 21, len(labels), 0))
        return

    class Labels:
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int) -> tuple[int]:
            return (int(labels[i]),)

    DatasetWriter(str(path), {"label": IntField()}, num_workers=1).from_indexed_dataset(Labels())


def _make_sidecar_beton(
    tmp_path: Path, train_root: Path, order: np.ndarray, skipped: list[str] | None = None
) -> Path:
    ds = open_dataset(train_root)
    assert ds.files is not None
    files = [ds.files[int(i)] for i in order]
    labels = ds.labels[order]
    beton = tmp_path / "train.beton"
    _write_beton(beton, labels)
    write_sidecar(
        beton,
        source_root=str(train_root),
        classes=ds.classes,
        files=files,
        labels=labels.tolist(),
        skipped=[{"file": f, "reason": "truncated JPEG"} for f in skipped or []],
        writer={"max_resolution": 64},
        content_hash={},
        created="2024-01-01T00:00:00",
        toolkit_version="test",
    )
    return beton


def test_beton_sidecar_resolution_matches_the_folder(train_root, tmp_path):
    n = len(open_dataset(train_root).labels)
    # Store the images in another order than the folder: splits name the same files all the same.
    order = np.random.default_rng(0).permutation(n)
    beton = _make_sidecar_beton(tmp_path, train_root, order)
    folder = make_splits(train_root, tmp_path / "f", per_class=5, seed=7, val_per_class=2)
    packed = make_splits(beton, tmp_path / "b", per_class=5, seed=7, val_per_class=2)
    for role in ("labelled", "val"):
        assert _body(folder[role]) == _body(packed[role])
    official = make_splits(beton, tmp_path / "o", official="1%", dataset_classes_only=True)
    ds = open_dataset(beton)
    assert ds.kind == "ffcv" and ds.files is not None
    idx = resolve_names(read_split(official["labelled"]), ds.files)
    # Each name lands on the .beton sample holding that file, whose label is the name's class.
    assert [Path(ds.files[i]).name for i in idx] == ONE_HERE
    assert [ds.classes[ds.labels[i]] for i in idx] == [split_entry_class(x) for x in ONE_HERE]
    assert sorted(idx.tolist()) != idx.tolist() or len(idx) < 2  # indices follow the .beton's own order


def test_beton_missing_files_mention_skipped_and_missing_sidecar(train_root, tmp_path):
    ds = open_dataset(train_root)
    assert ds.files is not None
    lost = f"{CLASSES[0]}/{ONE_HERE[1]}"
    assert lost in ds.files
    keep = np.array([i for i, f in enumerate(ds.files) if f != lost])
    beton = _make_sidecar_beton(tmp_path, train_root, keep, skipped=[lost])
    with pytest.raises(ValueError, match=r"1 of 38 names .* 1 of them were skipped as unreadable"):
        make_splits(beton, tmp_path / "s", official="1%", dataset_classes_only=True)
    other = tmp_path / "other.beton"
    other.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no sidecar index"):
        make_splits(other, tmp_path / "s", per_class=2)


# --------------------------------------------------------------------------- the command line

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["make-splits", *args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def test_cli_official_and_draws(train_root, tmp_path):
    out = tmp_path / "s1"
    code, text = _run(
        "--dataset", str(train_root), str(out), "--official", "1%", "--val", "--dataset-classes-only"
    )
    assert code == 0, text
    assert "dropped 12773 of 12811 names" in text and "wrote labelled" in text and "wrote val" in text
    assert _body(out / "labelled.txt") == ONE_HERE and _body(out / "val.txt") == VAL_HERE
    code, text = _run(str(train_root), str(tmp_path / "s2"), "--per-class", "4", "--seed", "1")
    assert code == 0, text
    assert "labelled: 12 images in 3 of 3 classes, 4-4 per class" in text
    assert not (tmp_path / "s2" / "val.txt").exists()
    digest = hashlib.sha256((tmp_path / "s2" / "labelled.txt").read_bytes()).hexdigest()
    code, text = _run(str(train_root), str(tmp_path / "s3"), "--per-class", "4", "--seed", "1")
    assert code == 0 and hashlib.sha256((tmp_path / "s3" / "labelled.txt").read_bytes()).hexdigest() == digest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--official", "1%"], "12773 of 12811 names in official list 1% are not in"),
        (["--official", "5%"], "neither one of the shipped lists"),
        (["--per-class", "2", "--official", "1%"], "exactly one of --per-class, --percent or --official"),
        (["--per-class", "2", "--val", "--val-per-class", "2"], "not both"),
        (["--per-class", "2", "--dataset-classes-only"], "needs official or val"),
    ],
)
def test_cli_errors_exit_2(train_root, tmp_path, args, message):
    code, text = _run(str(train_root), str(tmp_path / "s"), *args)
    assert code == 2 and message in " ".join(text.split()), text
    code, text = _run(str(tmp_path / "s"), "--per-class", "2")
    assert code == 2 and "give the dataset and the output directory" in text
    code, text = _run(
        "--dataset", str(train_root), str(tmp_path / "a"), str(tmp_path / "b"), "--per-class", "2"
    )
    assert code == 2 and "only the output directory" in text
