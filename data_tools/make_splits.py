"""Write labelled (and optional validation) split files for a dataset (``paws make-splits``).

The dataset is one of:

* an array dataset directory (``meta.json``; `paws convert-dataset`): splits are train indices;
* an ImageFolder train root (one folder per class, ImageNet layout ``train/<wnid>/<wnid>_<n>.JPEG``), scanned
  exactly as torchvision's ImageFolder scans it: splits are file names;
* an FFCV ``.beton`` with its sidecar index ``X.beton.index.json``: splits are file names, resolved through it.

The labelled set is an official list (``official``: "1%", "10%", a shipped CIFAR key, or a split file), or a
seeded class-balanced draw (``per_class`` / ``percent``). The held-out set is ImageNet's official ``val.txt``
(``val=True``) or a seeded draw of ``val_per_class`` images per class; either way it is disjoint from the
labelled set. Every name is resolved against the dataset before anything is written, so a split that does not
belong to the dataset fails here, not hours into training.

Draws on file datasets are made over the files sorted by their ``<class>/<file>`` path, so the same images give
the same split whatever order the dataset stores them in (an ImageFolder and its .beton agree).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from paws_cli.data.datasets.arrays import META_FILE, load_array_dataset
from paws_cli.data.splits.files import (
    OFFICIAL_PREFIX,
    SplitFile,
    make_balanced_split,
    official_split,
    read_split,
    resolve_names,
    restrict_to_classes,
    split_entry_class,
    write_split,
)
from paws_cli.data.splits.official import OFFICIAL_LISTS, official_list

#: Offset between the labelled draw's seed and the validation draw's, so the two use unrelated streams.
VAL_SEED_OFFSET = 1_000_003

Log = Callable[[str], None]


@dataclass
class DatasetFiles:
    """What a split is made against: labels in dataset order, and file names for image datasets."""

    kind: Literal["array", "imagefolder", "ffcv"]
    name: str
    source: Path
    labels: np.ndarray
    classes: list[str]
    files: list[str] | None = None  # "<class>/<file>" in dataset order; None for array datasets
    skipped: list[str] = field(default_factory=list)  # files a conversion left out (for error hints)

    def label(self) -> str:
        """How messages name the dataset."""
        return f"{self.kind} dataset {self.source}"

    def describe(self) -> str:
        """The label with its size."""
        return f"{self.label()} ({len(self.labels)} images, {len(self.classes)} classes)"


def _scan_imagefolder(root: Path) -> DatasetFiles:
    """Classes and files exactly as torchvision's ImageFolder sees them (sorted classes, sorted walk)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    train = root / "train"
    if train.is_dir() and any(p.is_dir() for p in train.iterdir()):
        raise ValueError(
            f"{root} holds a train/ folder of class folders: it looks like a dataset root, not a train root. "
            f"Pass {train} (splits name training images)"
        )
    try:
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{root} is not an ImageFolder train root with images in every class folder: {exc}"
        ) from None
    files = [Path(p).relative_to(root).as_posix() for p, _ in samples]
    labels = np.array([c for _, c in samples], dtype=np.int64)
    return DatasetFiles("imagefolder", "imagefolder", root, labels, list(classes), files)


def _read_beton(path: Path) -> DatasetFiles:
    try:
        from paws_cli.data.backends.sidecar import read_sidecar
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        raise ValueError(
            f"cannot read {path}: this installation lacks paws_cli.data.backends.sidecar ({exc})"
        ) from exc
    sidecar = read_sidecar(path)
    files = [str(f) for f in sidecar.files]
    labels = np.asarray(sidecar.labels, dtype=np.int64)
    if len(files) != len(labels):
        raise ValueError(f"the sidecar index of {path} lists {len(files)} files but {len(labels)} labels")
    skipped = [str(s["file"]) if isinstance(s, Mapping) else str(s) for s in (sidecar.skipped or [])]
    return DatasetFiles("ffcv", "ffcv", path, labels, list(sidecar.classes), files, skipped)


def open_dataset(path: str | os.PathLike[str]) -> DatasetFiles:
    """Recognise the dataset at ``path`` (array directory, ImageFolder train root or .beton) and index it."""
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(
            f"dataset {root} does not exist; give an array dataset directory, an ImageFolder train root or a .beton"
        )
    if root.is_file():
        if root.suffix != ".beton":
            raise ValueError(
                f"dataset {root} is a file but not a .beton; give an array dataset directory, an ImageFolder "
                "train root or an FFCV .beton (with its sidecar index)"
            )
        return _read_beton(root)
    if (root / META_FILE).is_file():
        ds = load_array_dataset(root)
        return DatasetFiles("array", ds.name, root, np.asarray(ds.train_labels), list(ds.class_names))
    return _scan_imagefolder(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_official(official: str | os.PathLike[str]) -> tuple[SplitFile, dict[str, object]]:
    """A shipped list by key ("1%", "10%", "val", "cifar10-4000-73", ...; keys win) or a split file by path."""
    text = str(official).removeprefix(OFFICIAL_PREFIX)
    if text.strip().lower().removesuffix("%") in {k.removesuffix("%") for k in OFFICIAL_LISTS}:
        entry = official_list(text)
        fields: dict[str, object] = {
            "official": entry.key,
            "official_file": entry.original_name,
            "official_sha256": entry.original_sha256,
        }
        return official_split(entry.key), fields
    path = Path(official).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"official split {text!r} is neither one of the shipped lists ({', '.join(OFFICIAL_LISTS)}) nor an "
            "existing split file (there is no random fallback)"
        )
    split = read_split(path)
    return split, {"official": str(path.resolve()), "official_sha256": _sha256(path)}


def _index_ids(split: SplitFile, ds: DatasetFiles, what: str) -> np.ndarray:
    if split.kind != "index":
        raise ValueError(
            f"{what} lists file names, but array dataset {ds.source} needs train indices; file-name splits go "
            "with an ImageFolder train root or a .beton"
        )
    ids = np.asarray(split.ids, dtype=np.int64)
    if int(ids.max()) >= len(ds.labels):
        raise ValueError(
            f"{what} has indices up to {int(ids.max())}, outside [0, {len(ds.labels)}) (the train-set size of "
            f"{ds.source}); this split does not belong to this dataset"
        )
    return np.sort(ids)


def _name_ids(
    split: SplitFile, ds: DatasetFiles, what: str, classes_only: bool, log: Log
) -> tuple[np.ndarray, list[str], dict[str, object]]:
    """Resolve a file-name list against the dataset, optionally (explicitly) restricted to its classes."""
    assert ds.files is not None
    if split.kind != "name":
        raise ValueError(
            f"{what} lists integer indices, but {ds.describe()} is addressed by file name; index splits go "
            "with array datasets and CIFAR-10"
        )
    names = list(split.ids)  # type: ignore[arg-type]
    extra: dict[str, object] = {}
    if classes_only:
        names, dropped = restrict_to_classes(names, ds.classes)
        dropped_classes = sorted({split_entry_class(n) for n in dropped})
        if not names:
            raise ValueError(
                f"none of the {len(dropped)} names in {what} belongs to one of the {len(ds.classes)} classes of "
                f"{ds.describe()} (e.g. dataset classes {ds.classes[:3]}, split classes {dropped_classes[:3]})"
            )
        if dropped:
            log(
                f"{what}: --dataset-classes-only dropped {len(dropped)} of {len(dropped) + len(names)} names, "
                f"from {len(dropped_classes)} classes the dataset lacks (e.g. {dropped_classes[:5]}); kept "
                f"{len(names)}"
            )
            extra = {"dataset_classes_only": "true", "dropped_names": len(dropped)}
    ids = resolve_names(names, ds.files, dataset=ds.label(), skipped=ds.skipped, what=what)
    return ids, names, extra


def _official_labelled(
    official: str | os.PathLike[str], ds: DatasetFiles, classes_only: bool, log: Log
) -> tuple[np.ndarray, np.ndarray | list[str], dict[str, object]]:
    """Dataset indices, entries to write and header fields of an official labelled list."""
    split, fields = _load_official(official)
    what = f"official list {fields['official']}"
    if ds.kind == "array":
        ids = _index_ids(split, ds, what)
        return ids, ids, fields
    ids, names, extra = _name_ids(split, ds, what, classes_only, log)
    return ids, names, {**fields, **extra}


def _official_val(
    ds: DatasetFiles, classes_only: bool, log: Log
) -> tuple[np.ndarray, list[str], dict[str, object]]:
    """ImageNet's official held-out list (val.txt), resolved against the dataset."""
    split, fields = _load_official("val")
    ids, names, extra = _name_ids(split, ds, "the official held-out list val.txt", classes_only, log)
    return ids, names, {**fields, **extra}


def _draw(
    ds: DatasetFiles,
    *,
    per_class: int | None,
    percent: float | None,
    seed: int,
    exclude: np.ndarray | None,
) -> np.ndarray:
    """Seeded class-balanced draw of dataset indices, over a storage-order-independent file order.

    ``exclude``: dataset indices never drawn. Array datasets: sorted indices; file datasets: indices sorted
    by the files' paths.
    """
    order = np.argsort(np.asarray(ds.files), kind="stable") if ds.files is not None else None
    labels = ds.labels if order is None else ds.labels[order]
    excl = exclude
    if order is not None and exclude is not None:
        position = np.empty(len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        excl = position[exclude]
    try:
        picked = make_balanced_split(labels, per_class=per_class, percent=percent, seed=seed, exclude=excl)
    except ValueError as exc:
        named = ", ".join(f"{i} = {c!r}" for i, c in enumerate(ds.classes[:3]))
        more = ", ..." if len(ds.classes) > 3 else ""
        raise ValueError(f"{ds.describe()}: {exc} (class ids number its classes: {named}{more})") from None
    # File datasets: indices in path order, so the written split is the same whatever the storage order.
    return np.sort(picked) if order is None else order[np.sort(picked)]


def _summary(role: str, ids: np.ndarray, ds: DatasetFiles) -> str:
    counts = np.bincount(ds.labels[ids], minlength=len(ds.classes))
    present = counts[counts > 0]
    return (
        f"{role}: {len(ids)} images in {len(present)} of {len(ds.classes)} classes, "
        f"{int(present.min())}-{int(present.max())} per class"
    )


def make_splits(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    per_class: int | None = None,
    percent: float | None = None,
    seed: int = 0,
    official: str | os.PathLike[str] | None = None,
    val: bool = False,
    val_per_class: int = 0,
    dataset_classes_only: bool = False,
    log: Log | None = None,
) -> dict[str, Path]:
    """Write ``labelled.txt`` (and ``val.txt`` when asked) into ``out_dir``; return their paths by role.

    ``official``: "1%" / "10%" (the shipped ImageNet lists), a shipped CIFAR key such as "cifar10-4000-73", or
    a split file. ``val``: the official ImageNet held-out list; ``val_per_class``: a seeded held-out draw.
    ``dataset_classes_only``: keep only the official names whose class the dataset has (reported via ``log``).
    """
    say: Log = log or (lambda _msg: None)
    if sum(x is not None for x in (per_class, percent, official)) != 1:
        raise ValueError("give exactly one of per_class, percent or official for the labelled split")
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
    if val and val_per_class:
        raise ValueError(
            "give either val (the official held-out list) or val_per_class (a seeded draw), not both"
        )
    if dataset_classes_only and official is None and not val:
        raise ValueError("dataset_classes_only restricts official lists; it needs official or val")
    ds = open_dataset(dataset_dir)
    if ds.kind == "array" and (val or dataset_classes_only):
        raise ValueError(
            f"array dataset {ds.source} has no file names: the official held-out list and "
            "dataset_classes_only apply to ImageFolder/.beton datasets; use val_per_class for a seeded held-out draw"
        )
    val_ids: np.ndarray | None = None
    val_out: np.ndarray | list[str] | None = None
    val_fields: dict[str, object] = {}
    if official is not None:
        labelled, labelled_out, fields = _official_labelled(official, ds, dataset_classes_only, say)
        if val:
            val_ids, val_out, val_fields = _official_val(ds, dataset_classes_only, say)
            shared = np.intersect1d(labelled, val_ids)
            if shared.size:
                assert ds.files is not None
                raise ValueError(
                    f"official list {fields['official']} and the official held-out list share {shared.size} "
                    f"images, e.g. {[ds.files[int(i)] for i in shared[:5]]}; they must be disjoint"
                )
    else:
        if val:  # resolved first: the labelled draw avoids the held-out images
            val_ids, val_out, val_fields = _official_val(ds, dataset_classes_only, say)
        labelled = _draw(ds, per_class=per_class, percent=percent, seed=seed, exclude=val_ids)
        labelled_out = labelled if ds.files is None else [ds.files[int(i)] for i in labelled]
        fields = {"per_class": per_class} if per_class is not None else {"percent": percent}
        fields["seed"] = seed
        if val_ids is not None:
            fields["disjoint_from"] = "val.txt"
    if val_per_class > 0:
        val_seed = seed + VAL_SEED_OFFSET
        val_ids = _draw(ds, per_class=val_per_class, percent=None, seed=val_seed, exclude=labelled)
        val_out = val_ids if ds.files is None else [ds.files[int(i)] for i in val_ids]
        val_fields = {"per_class": val_per_class, "seed": val_seed}

    base = {"dataset": ds.name}
    source = {"source": str(ds.source)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"labelled": write_split(out / "labelled.txt", labelled_out, {**base, **fields, **source})}
    say(_summary("labelled", np.asarray(labelled), ds))
    if val_out is not None and val_ids is not None:
        written["val"] = write_split(
            out / "val.txt",
            val_out,
            {**base, **val_fields, "role": "val", "disjoint_from": "labelled.txt", **source},
        )
        say(_summary("val", val_ids, ds))
    return written
