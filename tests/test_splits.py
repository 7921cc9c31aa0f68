"""Balanced split draws, split-file reading/writing (own and official formats), the shipped official lists,
file-name resolution, the support feasibility check and make_splits on array datasets.

The official lists are tested through the copies shipped inside the package (CI has no /work/shared); where
/work/shared/splits exists, the shipped copies are also compared byte for byte with it.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from data_tools.make_splits import make_splits
from paws_cli.data.datasets.arrays import write_array_dataset
from paws_cli.data.splits.files import (
    SplitFile,
    check_support_feasible,
    imagenet_class_of,
    labelled_subset_summary,
    make_balanced_split,
    official_split,
    official_split_path,
    read_split,
    resolve_names,
    restrict_to_classes,
    split_entry_class,
    write_split,
)
from paws_cli.data.splits.official import OFFICIAL_LISTS, SPLITS_DIR, official_list

SHARED_SPLITS = Path("/work/shared/splits")


def toy_labels() -> np.ndarray:
    # Class sizes 50, 30, 20, shuffled so that classes are interleaved.
    labels = np.repeat(np.arange(3), [50, 30, 20])
    return np.random.default_rng(1).permutation(labels)


# --------------------------------------------------------------------------- balanced draws


def test_balanced_per_class_exact_counts():
    labels = toy_labels()
    idx = make_balanced_split(labels, per_class=7, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=3), [7, 7, 7])


def test_balanced_percent_rounds_per_class():
    labels = toy_labels()
    # 10% of 50/30/20 = 5/3/2; 25% = 12.5/7.5/5 -> half rounds up to 13/8/5.
    np.testing.assert_array_equal(
        np.bincount(labels[make_balanced_split(labels, percent=10, seed=0)]), [5, 3, 2]
    )
    np.testing.assert_array_equal(
        np.bincount(labels[make_balanced_split(labels, percent=25, seed=0)]), [13, 8, 5]
    )
    assert len(make_balanced_split(labels, percent=100, seed=0)) == 100


def test_balanced_deterministic_and_seed_dependent():
    labels = toy_labels()
    a = make_balanced_split(labels, per_class=10, seed=5)
    np.testing.assert_array_equal(a, make_balanced_split(labels, per_class=10, seed=5))
    others = [make_balanced_split(labels, per_class=10, seed=s) for s in range(6, 11)]
    assert all(not np.array_equal(a, b) for b in others)


def test_balanced_draw_is_uniform_within_class():
    # Every image of a 20-image class should be drawn with probability 5/20 over many seeds.
    labels = np.repeat(np.arange(2), 20)
    hits = np.zeros(40)
    trials = 2000
    for seed in range(trials):
        hits[make_balanced_split(labels, per_class=5, seed=seed)] += 1
    freq = hits / trials
    # Binomial std of a frequency at p=0.25, n=2000 is ~0.0097; allow 5 sigma.
    assert np.abs(freq - 0.25).max() < 0.05


def test_balanced_exclusion():
    labels = toy_labels()
    first = make_balanced_split(labels, per_class=10, seed=0)
    second = make_balanced_split(labels, per_class=10, seed=0, exclude=first)
    assert np.intersect1d(first, second).size == 0
    np.testing.assert_array_equal(np.bincount(labels[second]), [10, 10, 10])
    # Class 2 has 20 images: after excluding 10, exactly the other 10 remain.
    rest = make_balanced_split(labels, per_class=10, seed=3, exclude=first)
    np.testing.assert_array_equal(
        np.sort(rest[labels[rest] == 2]), np.setdiff1d(np.flatnonzero(labels == 2), first)
    )


def test_balanced_not_enough_images():
    labels = toy_labels()
    with pytest.raises(
        ValueError, match=r"class 2: 25 asked but only 20 available \(20 in the class, 0 excluded\)"
    ):
        make_balanced_split(labels, per_class=25, seed=0)
    taken = make_balanced_split(labels, per_class=15, seed=0)
    with pytest.raises(
        ValueError, match=r"class 2: 10 asked but only 5 available \(20 in the class, 15 excluded\)"
    ):
        make_balanced_split(labels, per_class=10, seed=0, exclude=taken)
    # A label id with no images at all is a class that cannot be served.
    with pytest.raises(ValueError, match=r"class 1: 1 asked but only 0 available"):
        make_balanced_split(np.array([0, 0, 2, 2]), per_class=1, seed=0)
    with pytest.raises(ValueError, match=r"rounds to 0"):
        make_balanced_split(labels, percent=1, seed=0)


def test_balanced_argument_errors():
    labels = toy_labels()
    with pytest.raises(ValueError, match=r"exactly one of per_class or percent"):
        make_balanced_split(labels, seed=0)
    with pytest.raises(ValueError, match=r"exactly one of per_class or percent"):
        make_balanced_split(labels, per_class=2, percent=10, seed=0)
    with pytest.raises(ValueError, match=r"per_class must be a positive integer"):
        make_balanced_split(labels, per_class=0, seed=0)
    with pytest.raises(ValueError, match=r"percent must be in \(0, 100\]"):
        make_balanced_split(labels, percent=150, seed=0)
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer"):
        make_balanced_split(labels, per_class=2, seed=-1)
    with pytest.raises(ValueError, match=r"outside"):
        make_balanced_split(labels, per_class=2, seed=0, exclude=np.array([100]))


# --------------------------------------------------------------------------- split files


def test_write_read_round_trip(tmp_path):
    ids = np.array([3, 17, 0, 42])
    path = write_split(
        tmp_path / "s.txt", ids, {"dataset": "toy", "per_class": 2, "seed": 4, "source": "/a b/c"}
    )
    first = path.read_text().splitlines()[0]
    assert first.startswith("# paws-split v1 kind=index dataset=toy per_class=2 seed=4 source=")
    split = read_split(path, num_train=43)
    assert split.kind == "index" and not split.official
    np.testing.assert_array_equal(split.ids, ids)
    assert split.header == {
        "kind": "index",
        "dataset": "toy",
        "per_class": "2",
        "seed": "4",
        "source": "/a b/c",
    }

    names = ["n01440764_10026.JPEG", "n01443537_2.JPEG"]
    split = read_split(write_split(tmp_path / "n.txt", names, {"dataset": "imagenet"}))
    assert split.kind == "name" and split.ids == names and len(split) == 2


def test_write_split_errors(tmp_path):
    with pytest.raises(ValueError, match=r"2 duplicated ids, e.g. \['1', '2'\]"):
        write_split(tmp_path / "d.txt", [1, 2, 1, 2], {})
    with pytest.raises(ValueError, match=r"non-empty"):
        write_split(tmp_path / "e.txt", [], {})
    with pytest.raises(ValueError, match=r"header says kind=name"):
        write_split(tmp_path / "k.txt", [1], {"kind": "name"})
    with pytest.raises(ValueError, match=r">= 0"):
        write_split(tmp_path / "n.txt", [-1, 2], {})
    assert not any(tmp_path.iterdir())


def test_read_official_formats(tmp_path):
    (tmp_path / "cifar.txt").write_text("4780\n41187\n6123\n\n")
    split = read_split(tmp_path / "cifar.txt", num_train=50000)
    assert split.kind == "index" and split.official
    np.testing.assert_array_equal(split.ids, [4780, 41187, 6123])
    (tmp_path / "inet.txt").write_text("n04235860_14959.JPEG\r\nn02096294_8485.jpg\r\nx_1.png\r\n")
    split = read_split(tmp_path / "inet.txt")
    assert split.kind == "name" and split.ids == ["n04235860_14959.JPEG", "n02096294_8485.jpg", "x_1.png"]


def test_read_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no random fallback"):
        read_split(tmp_path / "missing.txt")
    p = tmp_path / "s.txt"
    p.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty"):
        read_split(p)
    p.write_text("1\n2\n3\n2\n1\n1\n")
    with pytest.raises(ValueError, match=r"2 duplicated identifiers \(3 extra lines\), e.g. \['1', '2'\]"):
        read_split(p)
    p.write_text("1\n2\nn01_3.JPEG\n")
    with pytest.raises(ValueError, match=r"mixes kinds.*line 3"):
        read_split(p)
    p.write_text("a_1.JPEG\n7\n")
    with pytest.raises(ValueError, match=r"mixes kinds.*line 2"):
        read_split(p)
    p.write_text("1\n2\n3x\n4\n")
    with pytest.raises(ValueError, match=r"line 3: '3x' is not an integer index"):
        read_split(p)
    p.write_text("1\n49999\n50000\n")
    with pytest.raises(ValueError, match=r"1 indices outside \[0, 50000\).*first 50000 on line 3"):
        read_split(p, num_train=50000)
    p.write_text("3\n-1\n")
    with pytest.raises(ValueError, match=r"negative, first -1 on line 2"):
        read_split(p)
    p.write_text("hello\n")
    with pytest.raises(ValueError, match=r"cannot tell the kind"):
        read_split(p)
    p.write_text("# paws-split v9 kind=index\n1\n")
    with pytest.raises(ValueError, match=r"not version v1"):
        read_split(p)
    p.write_text("# paws-split v1 kind=frames\n1\n")
    with pytest.raises(ValueError, match=r"kind='frames'"):
        read_split(p)
    p.write_text("# paws-split v1 kind=index\n1\nn01_3.JPEG\n")
    with pytest.raises(ValueError, match=r"line 3"):
        read_split(p)


def test_imagenet_helpers():
    assert imagenet_class_of("n01440764_10026.JPEG") == "n01440764"
    assert imagenet_class_of("train/n01440764/n01440764_10026.JPEG") == "n01440764"
    with pytest.raises(ValueError, match=r"not an ImageNet training file name"):
        imagenet_class_of("cat.jpg")
    assert official_split_path("1%") == "99percent.txt"
    assert official_split_path("10%") == "90percent.txt"
    assert official_split_path("10") == "90percent.txt"
    with pytest.raises(ValueError, match=r"no official ImageNet split for '5%'"):
        official_split_path("5%")


def test_labelled_subset_summary():
    labels = np.array([0, 1, 2, 2, 1, 0, 3])
    s = labelled_subset_summary(np.array([0, 2, 3, 5]), labels)
    assert s["per_class"] == {0: 2, 1: 0, 2: 2, 3: 0} and s["min"] == 0 and s["max"] == 2 and s["total"] == 4
    s = labelled_subset_summary(["n1_1.JPEG", "n1_2.JPEG", "n2_1.JPEG"])
    assert s["per_class"] == {"n1": 2, "n2": 1} and (s["min"], s["max"], s["num_classes"]) == (1, 2, 2)
    with pytest.raises(ValueError, match=r"outside"):
        labelled_subset_summary(np.array([7]), labels)


# --------------------------------------------------------------------------- make_splits


@pytest.fixture()
def toy_dataset(tmp_path) -> Path:
    labels = toy_labels()
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (len(labels), 4, 4), dtype=np.uint8), labels)
    test = (rng.integers(0, 256, (6, 4, 4), dtype=np.uint8), np.arange(6) % 3)
    write_array_dataset(tmp_path / "ds", "toy", train, test, ["a", "b", "c"], source="test")
    return tmp_path / "ds"


def test_make_splits_balanced_with_val(toy_dataset, tmp_path):
    out = make_splits(toy_dataset, tmp_path / "splits", per_class=6, seed=2, val_per_class=4)
    assert set(out) == {"labelled", "val"}
    labels = toy_labels()
    lab = read_split(out["labelled"], num_train=100)
    val = read_split(out["val"], num_train=100)
    np.testing.assert_array_equal(lab.ids, make_balanced_split(labels, per_class=6, seed=2))
    np.testing.assert_array_equal(np.bincount(labels[lab.ids]), [6, 6, 6])
    np.testing.assert_array_equal(np.bincount(labels[val.ids]), [4, 4, 4])
    assert np.intersect1d(lab.ids, val.ids).size == 0
    assert lab.header["dataset"] == "toy" and lab.header["per_class"] == "6" and lab.header["seed"] == "2"
    assert val.header["role"] == "val"


def test_make_splits_percent_and_official(toy_dataset, tmp_path):
    out = make_splits(toy_dataset, tmp_path / "p", percent=10, seed=0)
    assert set(out) == {"labelled"} and len(read_split(out["labelled"]).ids) == 10
    official = tmp_path / "official.txt"
    official.write_text("5\n99\n0\n")
    out = make_splits(toy_dataset, tmp_path / "o", official=official, val_per_class=2)
    np.testing.assert_array_equal(read_split(out["labelled"]).ids, [0, 5, 99])
    assert np.intersect1d(read_split(out["val"]).ids, [0, 5, 99]).size == 0
    official.write_text("5\n100\n")
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        make_splits(toy_dataset, tmp_path / "bad", official=official)
    official.write_text("n01_1.JPEG\n")
    with pytest.raises(ValueError, match=r"needs train indices"):
        make_splits(toy_dataset, tmp_path / "bad", official=official)
    with pytest.raises(ValueError, match=r"exactly one of per_class, percent or official"):
        make_splits(toy_dataset, tmp_path / "bad", official=official, per_class=2)
    with pytest.raises(FileNotFoundError, match=r"neither one of the shipped lists.*no random fallback"):
        make_splits(toy_dataset, tmp_path / "bad", official=tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=r"has no file names.*val_per_class"):
        make_splits(toy_dataset, tmp_path / "bad", per_class=2, val=True)
    with pytest.raises(ValueError, match=r"either val .* or val_per_class"):
        make_splits(toy_dataset, tmp_path / "bad", per_class=2, val=True, val_per_class=2)
    assert not (tmp_path / "bad").exists()  # nothing is written when the request is refused


def test_make_splits_shipped_cifar_list_needs_50000_images(toy_dataset, tmp_path):
    # The toy dataset has 100 images; the shipped CIFAR-10 list indexes 50,000: refused, naming the size.
    with pytest.raises(ValueError, match=r"outside \[0, 100\).*does not belong to this dataset"):
        make_splits(toy_dataset, tmp_path / "c", official="cifar10-4000-73")


# --------------------------------------------------------------------------- official files (shipped copies)


def _shared(name: str) -> Path:
    path = SHARED_SPLITS / name
    if not path.is_file():
        pytest.skip(f"official split file {path} is not present on this machine")
    return path


@pytest.mark.parametrize("key", list(OFFICIAL_LISTS))
def test_shipped_list_matches_recorded_provenance(key):
    entry = official_list(key)
    data = gzip.decompress(entry.path.read_bytes())
    assert hashlib.sha256(data).hexdigest() == entry.original_sha256
    assert len(data) == entry.original_bytes
    assert len(official_split(key)) == entry.num_lines


def test_shipped_lists_are_small_and_all_recorded():
    files = sorted(SPLITS_DIR.glob("*.txt.gz"))
    assert sorted(e.file for e in OFFICIAL_LISTS.values()) == [f.name for f in files]
    assert sum(f.stat().st_size for f in files) < 1_000_000
    assert "99percent.txt" in (SPLITS_DIR / "README.md").read_text()


def test_shipped_imagenet_lists_counts():
    one, ten, val = official_split("1%"), official_split("10%"), official_split("val")
    assert one.kind == ten.kind == val.kind == "name" and one.official
    assert (len(one), len(ten), len(val)) == (12811, 128116, 12000)
    assert set(one.ids) <= set(ten.ids)
    assert not set(val.ids) & set(ten.ids)
    s1 = labelled_subset_summary(one.ids)
    assert s1["num_classes"] == 1000 and (s1["min"], s1["max"]) == (12, 13)
    s10 = labelled_subset_summary(ten.ids)
    # 10% of each class's training images (732-1300 per class), rounded as the SimCLR authors did.
    assert s10["num_classes"] == 1000 and s10["min"] >= 73 and s10["max"] <= 130
    sv = labelled_subset_summary(val.ids)
    assert sv["num_classes"] == 1000 and sv["min"] == sv["max"] == 12
    assert set(s1["per_class"]) == set(s10["per_class"]) == set(sv["per_class"])


@pytest.mark.parametrize("seed", [73, 91, 152, 321, 401])
def test_shipped_cifar_lists(seed):
    split = official_split(f"cifar10-4000-{seed}")
    assert split.kind == "index" and len(split) == 4000 and len(set(split.ids.tolist())) == 4000
    assert int(split.ids.min()) >= 0 and int(split.ids.max()) < 50000


def test_official_keys():
    assert official_list("1%").original_name == official_split_path("1%") == "99percent.txt"
    assert official_list("10").original_name == official_split_path("10%") == "90percent.txt"
    with pytest.raises(ValueError, match=r"no official split list '5%'; the shipped ones are: 1%, 10%, val"):
        official_list("5%")


@pytest.mark.parametrize("key", list(OFFICIAL_LISTS))
def test_shipped_copy_is_byte_identical_to_shared(key):
    entry = official_list(key)
    assert gzip.decompress(entry.path.read_bytes()) == _shared(entry.original_name).read_bytes()


def test_official_imagenet_splits_shared():
    one = read_split(_shared(official_split_path("1%")))
    ten = read_split(_shared(official_split_path("10%")))
    val = read_split(_shared("val.txt"))
    assert (len(one), len(ten), len(val)) == (12811, 128116, 12000)
    assert one.ids == official_split("1%").ids and val.ids == official_split("val").ids


def test_official_prefix_reads_the_shipped_list():
    split = read_split("official:cifar10-4000-91", num_train=50000)
    np.testing.assert_array_equal(split.ids, official_split("cifar10-4000-91").ids)
    assert read_split("official:1%").ids == official_split("1%").ids
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        read_split("official:cifar10-4000-91", num_train=1000)
    with pytest.raises(ValueError, match=r"no official split list '2%'"):
        read_split("official:2%")


def test_read_gzipped_split(tmp_path):
    path = tmp_path / "s.txt.gz"
    path.write_bytes(gzip.compress(b"# paws-split v1 kind=index seed=1\n4\n2\n"))
    split = read_split(path, num_train=5)
    np.testing.assert_array_equal(split.ids, [4, 2])
    assert split.header["seed"] == "1"
    path.write_bytes(gzip.compress(b"4\n2\n")[:-6])  # truncated
    with pytest.raises(ValueError, match=r"s.txt.gz is unreadable"):
        read_split(path)


# --------------------------------------------------------------------------- names -> dataset indices

FILES = [
    "n01440764/n01440764_1.JPEG",
    "n01440764/n01440764_2.JPEG",
    "n01443537/n01443537_7.JPEG",
    "n01443537/shared.jpg",
    "n01484850/n01484850_3.JPEG",
    "n01484850/shared.jpg",
]


def test_resolve_bare_names_and_paths():
    idx = resolve_names(["n01484850_3.JPEG", "n01440764_1.JPEG", "n01443537/shared.jpg"], FILES)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, [4, 0, 3])  # in the split's order
    split = SplitFile("name", ["n01443537_7.JPEG"], {}, Path("x.txt"))
    np.testing.assert_array_equal(resolve_names(split, FILES), [2])


def test_resolve_missing_names_says_how_many_and_why():
    names = ["n01440764_1.JPEG", "n01440764_99.JPEG", "n09999999_1.JPEG", "n09999998_1.JPEG"]
    with pytest.raises(ValueError) as err:
        resolve_names(names, FILES, dataset="folder X")
    msg = str(err.value)
    assert "3 of 4 names in the split are not in folder X (6 images in 3 class folders)" in msg
    assert "'n01440764_99.JPEG'" in msg and "'n09999999_1.JPEG'" in msg
    assert (
        "2 of the split's 3 classes have no folder in the dataset" in msg and "--dataset-classes-only" in msg
    )
    with pytest.raises(ValueError, match=r"class folders exist but the files do not.*val instead of train"):
        resolve_names(["n01440764_99.JPEG"], FILES)
    val_files = [f"n01440764/ILSVRC2012_val_{i:08d}.JPEG" for i in range(5)]
    with pytest.raises(ValueError, match=r"named like ImageNet validation images.*train folder, not val"):
        resolve_names(["n01440764_1.JPEG"], val_files)
    with pytest.raises(ValueError, match=r"1 of them were skipped as unreadable"):
        resolve_names(["n01440764_5.JPEG"], FILES, skipped=["n01440764/n01440764_5.JPEG"])
    with pytest.raises(ValueError, match=r"not in"):
        resolve_names(["n01440764/n01440764_2.JPEG/"], FILES)  # paths must match exactly


def test_resolve_ambiguous_duplicate_and_index_splits():
    with pytest.raises(ValueError, match=r"1 bare file names .* several class folders.*<class>/<file>"):
        resolve_names(["shared.jpg"], FILES)
    with pytest.raises(ValueError, match=r"names 1 files twice"):
        resolve_names(["n01440764_2.JPEG", "n01440764/n01440764_2.JPEG"], FILES)
    with pytest.raises(ValueError, match=r"lists integer indices, not file names"):
        resolve_names(SplitFile("index", np.array([1]), {}, Path("i.txt")), FILES)
    with pytest.raises(ValueError, match=r"no images"):
        resolve_names(["a_1.JPEG"], [])


def test_restrict_to_classes_and_entry_class():
    assert split_entry_class("n01440764_1.JPEG") == "n01440764"
    assert split_entry_class("cats/img_1.png") == "cats"
    kept, dropped = restrict_to_classes(["b_1.JPEG", "a_2.JPEG", "c/x.png", "a/y.png"], ["a", "c"])
    assert kept == ["a_2.JPEG", "c/x.png", "a/y.png"] and dropped == ["b_1.JPEG"]


# --------------------------------------------------------------------------- support feasibility


def test_check_support_feasible():
    labels = np.repeat([0, 1, 2], [7, 12, 13])
    check_support_feasible(labels, images_per_class=7, classes_per_batch=3)
    with pytest.raises(
        ValueError, match=r"the labelled split: class 0 has 7 labelled images.*images_per_class=8"
    ):
        check_support_feasible(labels, images_per_class=8, classes_per_batch=3)
    # Shared classes over 2 processes: each sees n // 2 images, so class 0 offers 3 < 4.
    with pytest.raises(ValueError, match=r"3 per process with world_size=2"):
        check_support_feasible(labels, 4, 3, world_size=2, unique_classes_per_rank=False)
    check_support_feasible(labels, 3, 3, world_size=2, unique_classes_per_rank=False)
    with pytest.raises(ValueError, match=r"fewest labelled images, 7: class 0 = 'tench'"):
        check_support_feasible(labels, 8, 3, class_names=["tench", "goldfish", "shark"], what="split s.txt")
    with pytest.raises(ValueError, match=r"4 distinct classes per step, but the labelled subset has only 3"):
        check_support_feasible(labels, 1, 4)
