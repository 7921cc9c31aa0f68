"""Labelled-subset split files: the toolkit's own (with a header) and the official headerless lists.

Own format: first line ``# paws-split v1 kind=index|name dataset=NAME per_class=N|percent=P seed=S
source=...`` (values shell-quoted when needed), then one identifier per line: a 0-based index into the
train set for array datasets, or a file name of an ImageFolder / .beton dataset. A file name is either a bare
ImageNet-style name such as ``n01440764_10026.JPEG`` (the official lists; matched by file name, which must then
be unique in the dataset) or a ``<class>/<file>`` path relative to the train root (what `paws make-splits`
writes for its own draws; matched exactly). ``resolve_names`` turns either into dataset indices.
Official files (PAWS-SPEC.md section 10) are plain integer lists (CIFAR-10) or file-name lists (ImageNet); the
package ships them (``official_split``). Any split file may be gzipped (``.gz``).
A missing split file is always an error: the reference's silent fallback to a random split is a known flaw.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import shlex
import zlib
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from paws_cli.data.splits.official import official_list
from paws_cli.io_utils import atomic_write_text

HEADER_PREFIX = "# paws-split"
#: ``official:KEY`` names a list shipped with the package wherever a split file path is accepted.
OFFICIAL_PREFIX = "official:"
HEADER_VERSION = "v1"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_INT_RE = re.compile(r"^[+-]?\d+$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")

# The official ImageNet files are named after the UNLABELLED fraction: "99percent.txt" lists the 1% of
# images that keep their labels, "90percent.txt" the 10%.
_OFFICIAL_FILES = {"1%": "99percent.txt", "10%": "90percent.txt"}

Kind = Literal["index", "name"]


@dataclass
class SplitFile:
    """A parsed split file: ``ids`` is an int64 array (kind "index") or a list of names (kind "name")."""

    kind: Kind
    ids: np.ndarray | list[str]
    header: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def official(self) -> bool:
        """True for a headerless (official) file."""
        return not self.header

    def __len__(self) -> int:
        return len(self.ids)


def _balanced_counts(class_counts: np.ndarray, per_class: int | None, percent: float | None) -> np.ndarray:
    if (per_class is None) == (percent is None):
        raise ValueError("give exactly one of per_class or percent for a balanced split")
    if per_class is not None:
        if isinstance(per_class, bool) or int(per_class) != per_class or per_class < 1:
            raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
        return np.full(len(class_counts), int(per_class), dtype=np.int64)
    assert percent is not None
    if not (0 < float(percent) <= 100):
        raise ValueError(f"percent must be in (0, 100], got {percent!r}")
    # Round half up on percent*count/100 (multiplying first keeps integer percents exact).
    return np.array([math.floor(float(percent) * int(n) / 100 + 0.5) for n in class_counts], dtype=np.int64)


def make_balanced_split(
    labels: np.ndarray,
    *,
    per_class: int | None = None,
    percent: float | None = None,
    seed: int,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Seeded class-balanced draw of train indices (sorted int64), without replacement.

    ``per_class``: exactly that many per class; ``percent``: ``round(percent/100 * class size)`` per class.
    Classes are ``0..labels.max()``; ``exclude`` indices are never drawn (but still count for ``percent``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, found {int(labels.min())}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    num_classes = int(labels.max()) + 1
    class_counts = np.bincount(labels, minlength=num_classes)
    wanted = _balanced_counts(class_counts, per_class, percent)
    available = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        exclude = np.asarray(exclude)
        if exclude.size and (not np.issubdtype(exclude.dtype, np.integer) or exclude.ndim != 1):
            raise ValueError(
                f"exclude must be a 1-D integer array of indices, got {exclude.dtype} {exclude.shape}"
            )
        if exclude.size and (int(exclude.min()) < 0 or int(exclude.max()) >= len(labels)):
            raise ValueError(
                f"exclude holds indices in [{int(exclude.min())}, {int(exclude.max())}], "
                f"outside [0, {len(labels)})"
            )
        available[exclude.astype(np.int64)] = False
    what = f"per_class={per_class}" if per_class is not None else f"percent={percent}"
    problems = []
    for c in range(num_classes):
        n_avail = int(np.count_nonzero(available & (labels == c)))
        if wanted[c] == 0:
            problems.append(f"class {c}: {what} of {class_counts[c]} images rounds to 0")
        elif n_avail < wanted[c]:
            held = int(class_counts[c]) - n_avail
            problems.append(
                f"class {c}: {wanted[c]} asked but only {n_avail} available "
                f"({class_counts[c]} in the class, {held} excluded)"
            )
    if problems:
        raise ValueError(f"cannot draw a balanced split with {what}: " + "; ".join(problems))
    rng = np.random.default_rng(int(seed))
    picked = []
    for c in range(num_classes):
        pool = np.flatnonzero(available & (labels == c))
        picked.append(rng.choice(pool, size=int(wanted[c]), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _format_value(value: object) -> str:
    text = str(value)
    if not text or any(ch in text for ch in "\n\r"):
        raise ValueError(f"split header value {text!r} must be non-empty and on one line")
    return shlex.quote(text)


def write_split(
    path: str | os.PathLike[str], ids: Sequence[Any] | np.ndarray, header_fields: Mapping[str, object]
) -> Path:
    """Write a split file with a ``# paws-split v1`` header; the kind is taken from ``ids``."""
    path = Path(path)
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"split {path}: ids must be a non-empty 1-D list, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        kind: Kind = "index"
        if int(arr.min()) < 0:
            raise ValueError(f"split {path}: indices must be >= 0, found {int(arr.min())}")
        lines = [str(int(i)) for i in arr]
    elif arr.dtype.kind in "UO":
        kind = "name"
        lines = [str(n) for n in ids]
        bad = [n for n in lines if not n or n != n.strip() or "\n" in n or n.startswith("#")]
        if bad:
            raise ValueError(
                f"split {path}: names must be non-empty single lines without edge spaces: {bad[:3]}"
            )
    else:
        raise ValueError(f"split {path}: ids must be integers or strings, got dtype {arr.dtype}")
    dups = [k for k, v in Counter(lines).items() if v > 1]
    if dups:
        raise ValueError(f"split {path}: {len(dups)} duplicated ids, e.g. {dups[:5]}")
    given_kind = header_fields.get("kind")
    if given_kind is not None and given_kind != kind:
        raise ValueError(f"split {path}: header says kind={given_kind} but the ids are of kind {kind}")
    parts = [HEADER_PREFIX, HEADER_VERSION, f"kind={kind}"]
    for key, value in header_fields.items():
        if key == "kind":
            continue
        if not _KEY_RE.match(key):
            raise ValueError(f"split header key {key!r} must be a plain identifier")
        parts.append(f"{key}={_format_value(value)}")
    atomic_write_text(path, " ".join(parts) + "\n" + "\n".join(lines) + "\n")
    return path


def _parse_header(path: Path, line: str) -> dict[str, str]:
    try:
        tokens = shlex.split(line[1:].strip())
    except ValueError as exc:
        raise ValueError(f"split file {path}: unreadable header line ({exc}): {line!r}") from exc
    if len(tokens) < 2 or tokens[1] != HEADER_VERSION:
        raise ValueError(
            f"split file {path}: header {line!r} is not version {HEADER_VERSION}; re-create it with "
            "`paws make-splits`"
        )
    header: dict[str, str] = {}
    for tok in tokens[2:]:
        key, sep, value = tok.partition("=")
        if not sep or not key:
            raise ValueError(f"split file {path}: header field {tok!r} is not key=value")
        header[key] = value
    if header.get("kind") not in ("index", "name"):
        raise ValueError(f"split file {path}: header kind={header.get('kind')!r}, expected index or name")
    return header


def _is_image_name(text: str) -> bool:
    return text.lower().endswith(IMAGE_SUFFIXES)


def _read_text(path: Path) -> str:
    """The file's text; ``.gz`` files are decompressed (the shipped official lists are gzipped)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"split file {path} is unreadable ({exc}); re-create it or re-download it") from exc


def read_split(path: str | os.PathLike[str], *, num_train: int | None = None) -> SplitFile:
    """Read a split file (own format or an official headerless list) and validate it.

    ``path`` may also name a list shipped with the package as ``official:KEY`` (``official:1%``,
    ``official:cifar10-4000-73``; see ``paws_cli.data.splits.official``), so settings can say ``data.split=official:1%``.
    ``num_train``: the train-set size; index files must then lie in ``[0, num_train)``.
    """
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith(OFFICIAL_PREFIX):
        path = official_list(text[len(OFFICIAL_PREFIX) :]).path
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"split file {path} does not exist. There is no random fallback: pass an existing split file "
            "or make one with `paws make-splits`"
        )
    lines = _read_text(path).splitlines()
    header: dict[str, str] = {}
    entries: list[tuple[int, str]] = []  # (1-based line number, identifier)
    for lineno, raw in enumerate(lines, start=1):
        text = raw.strip()
        if lineno == 1 and text.startswith(HEADER_PREFIX):
            header = _parse_header(path, text)
        elif text and not text.startswith("#"):
            entries.append((lineno, text))
    if not entries:
        raise ValueError(f"split file {path} lists no identifiers (it is empty)")
    ints = [_INT_RE.match(t) is not None for _, t in entries]
    kind: Kind
    if header:
        kind = header["kind"]  # type: ignore[assignment]
    elif ints[0]:
        kind = "index"
    elif _is_image_name(entries[0][1]):
        kind = "name"
    else:
        raise ValueError(
            f"split file {path} line {entries[0][0]}: {entries[0][1]!r} is neither an integer index nor an "
            f"image file name ({'/'.join(IMAGE_SUFFIXES)}); cannot tell the kind of split"
        )
    if kind == "index":
        bad = [(n, t) for (n, t), ok in zip(entries, ints, strict=True) if not ok]
        if bad:
            n, t = bad[0]
            if not header and _is_image_name(t):
                raise ValueError(
                    f"split file {path} mixes kinds: integer indices and file names "
                    f"(first name {t!r} on line {n})"
                )
            raise ValueError(
                f"split file {path} line {n}: {t!r} is not an integer index ({len(bad)} such lines)"
            )
        values = np.array([int(t) for _, t in entries], dtype=np.int64)
        upper = num_train if num_train is not None else np.iinfo(np.int64).max
        out = np.flatnonzero((values < 0) | (values >= upper))
        if out.size:
            n, t = entries[int(out[0])]
            where = f"outside [0, {num_train}) (the train-set size)" if num_train is not None else "negative"
            raise ValueError(
                f"split file {path}: {out.size} indices {where}, first {t} on line {n}; "
                "this split does not belong to this dataset"
            )
    elif not header:
        bad_names = [(n, t) for n, t in entries if not _is_image_name(t)]
        if bad_names:
            n, t = bad_names[0]
            if _INT_RE.match(t):
                raise ValueError(
                    f"split file {path} mixes kinds: file names and integer indices "
                    f"(first index {t!r} on line {n})"
                )
            raise ValueError(
                f"split file {path} line {n}: {t!r} is not an image file name ({len(bad_names)} such)"
            )
    counts = Counter(t for _, t in entries)
    dups = [t for t, c in counts.items() if c > 1]
    if dups:
        raise ValueError(
            f"split file {path} has {len(dups)} duplicated identifiers "
            f"({sum(counts[d] - 1 for d in dups)} extra lines), e.g. {dups[:5]}"
        )
    if kind == "index":
        ids: np.ndarray | list[str] = np.array([int(t) for _, t in entries], dtype=np.int64)
    else:
        ids = [t for _, t in entries]
    return SplitFile(kind=kind, ids=ids, header=header, path=path)


def imagenet_class_of(name: str) -> str:
    """WordNet class of an ImageNet training file name: ``n01440764_10026.JPEG`` -> ``n01440764``."""
    base = Path(name).name
    cls, sep, _ = base.partition("_")
    if not sep or not cls:
        raise ValueError(f"{name!r} is not an ImageNet training file name like n01440764_10026.JPEG")
    return cls


def official_split_path(fraction: str) -> str:
    """File name of the official ImageNet list for a labelled fraction: "1%" -> "99percent.txt"."""
    key = str(fraction).strip().removesuffix("%") + "%"
    if key not in _OFFICIAL_FILES:
        raise ValueError(f"no official ImageNet split for {fraction!r}; use one of {list(_OFFICIAL_FILES)}")
    return _OFFICIAL_FILES[key]


def labelled_subset_summary(
    ids: Sequence[Any] | np.ndarray, labels: np.ndarray | None = None
) -> dict[str, Any]:
    """Images per class of a labelled subset, with min/max; ``labels`` maps indices to classes.

    For index ids every class ``0..labels.max()`` is listed (zero counts included); name ids without
    ``labels`` are grouped by their ImageNet class.
    """
    arr = np.asarray(ids)
    if arr.size == 0:
        raise ValueError("labelled subset is empty")
    if labels is not None:
        labels = np.asarray(labels)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"with labels, ids must be integer indices, got dtype {arr.dtype}")
        if int(arr.min()) < 0 or int(arr.max()) >= len(labels):
            raise ValueError(f"ids span [{int(arr.min())}, {int(arr.max())}], outside [0, {len(labels)})")
        counts = np.bincount(labels[arr], minlength=int(labels.max()) + 1)
        per_class: dict[Any, int] = {c: int(n) for c, n in enumerate(counts)}
    else:
        per_class = dict(sorted(Counter(imagenet_class_of(str(n)) for n in ids).items()))
    values = list(per_class.values())
    return {
        "total": int(arr.size),
        "num_classes": len(per_class),
        "per_class": per_class,
        "min": min(values),
        "max": max(values),
    }


# --------------------------------------------------------------------------- official lists shipped with the package


def official_split(key: str) -> SplitFile:
    """An official list shipped inside the package: "1%", "10%", "val" (ImageNet) or "cifar10-4000-SEED".

    The header stays empty (``official`` is True); the line count is checked against the recorded one.
    """
    entry = official_list(key)
    if not entry.path.is_file():
        raise FileNotFoundError(
            f"the packaged official list {entry.path} is missing: the installation is incomplete; reinstall paws-cli"
        )
    split = read_split(entry.path)
    if len(split) != entry.num_lines:
        raise ValueError(
            f"the packaged official list {entry.path} has {len(split)} entries, expected {entry.num_lines}; "
            "the installation is damaged; reinstall paws-cli"
        )
    return split


# --------------------------------------------------------------------------- file-name splits -> dataset indices

_VAL_PREFIX = "ILSVRC2012_val_"


def split_entry_class(name: str) -> str:
    """Class of a split entry: the folder of a ``<class>/<file>`` path, else the ImageNet class of the name."""
    if "/" in name:
        return name.split("/", 1)[0]
    return imagenet_class_of(name)


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _split_names(split: SplitFile | Sequence[str]) -> tuple[list[str], str]:
    if isinstance(split, SplitFile):
        if split.kind != "name":
            raise ValueError(
                f"split file {split.path} lists integer indices, not file names; an index split is used as is "
                "(it belongs to an array dataset or CIFAR-10, not to an image folder)"
            )
        return [str(n) for n in split.ids], f"split file {split.path}" if split.path else "the split"
    return [str(n) for n in split], "the split"


def _missing_hints(
    missing: list[str], names: list[str], files: Sequence[str], skipped: Collection[str]
) -> str:
    """Why names may be missing: skipped at conversion, the val folder, absent classes, or another dataset."""
    hints = []
    skipped_set = set(skipped) | {_basename(s) for s in skipped}
    n_skipped = sum(1 for m in missing if m in skipped_set)
    if n_skipped:
        hints.append(
            f"{n_skipped} of them were skipped as unreadable when the dataset was converted (see the sidecar's "
            "'skipped' list); fix those files and convert again"
        )
    sample = [_basename(str(f)) for f in files[: min(len(files), 1000)]]
    looks_like_val = bool(sample) and sum(b.startswith(_VAL_PREFIX) for b in sample) > len(sample) // 2
    if looks_like_val:
        hints.append(
            f"the dataset's files are named like ImageNet validation images ({_VAL_PREFIX}*); split lists name "
            "training images: use ImageNet's train folder, not val"
        )
    dataset_classes = {str(f).split("/", 1)[0] for f in files}
    split_classes: set[str] = set()
    absent: set[str] = set()
    for n in names:
        try:
            cls = split_entry_class(n)
        except ValueError:
            continue
        split_classes.add(cls)
        if cls not in dataset_classes:
            absent.add(cls)
    if absent:
        hints.append(
            f"{len(absent)} of the split's {len(split_classes)} classes have no folder in the dataset "
            f"(e.g. {sorted(absent)[:3]}): is it the right dataset, or a subset of the split's classes? To keep "
            "only the dataset's classes, say so explicitly (`paws make-splits --dataset-classes-only`)"
        )
    elif not n_skipped and not looks_like_val:
        hints.append(
            "their class folders exist but the files do not: wrong dataset, ImageNet val instead of train, or an "
            "incomplete copy?"
        )
    return "; ".join(hints)


def resolve_names(
    split: SplitFile | Sequence[str],
    files: Sequence[str],
    *,
    dataset: str = "the dataset",
    skipped: Collection[str] = (),
    what: str | None = None,
) -> np.ndarray:
    """Indices into ``files`` of the names a split lists, in the split's order (int64).

    ``files``: the dataset's images as ``<class>/<file>`` paths relative to its train root, in dataset order
    (ImageFolder order, or a .beton's sidecar ``files``). A split entry with a ``/`` must equal one of them;
    a bare name (``n01440764_10026.JPEG``, as in the official lists) matches the file of that name, which must
    be unique in the dataset. Any name that is not in the dataset is an error saying how many and showing
    examples, with hints (``skipped``: files the conversion left out, to say so). ``dataset`` names the
    dataset and ``what`` the split in messages (default: the split file's path).
    """
    names, default_what = _split_names(split)
    what = what or default_what
    if not names:
        raise ValueError(f"{what} lists no names")
    if len(files) == 0:
        raise ValueError(f"{dataset} has no images to resolve {what} against")
    by_path: dict[str, int] = {}
    by_base: dict[str, int] = {}  # -1: the same file name in several folders
    for i, f in enumerate(files):
        f = str(f)
        by_path[f] = i
        base = _basename(f)
        by_base[base] = -1 if base in by_base else i
    out = np.empty(len(names), dtype=np.int64)
    missing: list[str] = []
    ambiguous: list[str] = []
    for k, name in enumerate(names):
        idx = by_path.get(name) if "/" in name else by_base.get(name)
        if idx is None:
            missing.append(name)
        elif idx < 0:
            ambiguous.append(name)
        else:
            out[k] = idx
    if missing:
        classes = len({str(f).split("/", 1)[0] for f in files})
        raise ValueError(
            f"{len(missing)} of {len(names)} names in {what} are not in {dataset} ({len(files)} "
            f"images in {classes} class folders), e.g. {missing[:5]}; "
            + _missing_hints(missing, names, files, skipped)
        )
    if ambiguous:
        examples = [[f for f in map(str, files) if _basename(f) == a][:2] for a in ambiguous[:3]]
        raise ValueError(
            f"{len(ambiguous)} bare file names in {what} match files in several class folders of {dataset}, "
            f"e.g. {examples}; write those entries as <class>/<file> paths"
        )
    uniq, counts = np.unique(out, return_counts=True)
    if len(uniq) != len(out):
        twice = [str(files[int(i)]) for i in uniq[counts > 1][:5]]
        raise ValueError(
            f"{what} names {int((counts > 1).sum())} files twice (once by path, once by name), e.g. {twice}"
        )
    return out


def restrict_to_classes(names: Sequence[str], classes: Collection[str]) -> tuple[list[str], list[str]]:
    """Split ``names`` into those whose class is in ``classes`` and those dropped (both in input order).

    Only for explicit requests (``paws make-splits --dataset-classes-only``): callers must report the drop.
    """
    allowed = set(classes)
    kept: list[str] = []
    dropped: list[str] = []
    for n in names:
        (kept if split_entry_class(str(n)) in allowed else dropped).append(str(n))
    return kept, dropped


def check_support_feasible(
    labels_of_split: Sequence[int] | np.ndarray,
    images_per_class: int,
    classes_per_batch: int,
    *,
    world_size: int = 1,
    unique_classes_per_rank: bool = True,
    class_names: Sequence[str] | None = None,
    what: str = "the labelled split",
    section: str = "paws",
) -> None:
    """Raise a ValueError when the labelled split cannot fill support batches of K classes x P images.

    The rule is the support sampler's own (it validates on construction), so the two never disagree;
    ``class_names`` (indexed by label) adds the names of the classes with the fewest labelled images.
    """
    from paws_cli.data.sampling.samplers import SupportSampler  # torch-heavy; only needed here

    try:
        SupportSampler(
            labels_of_split,
            classes_per_batch=classes_per_batch,
            images_per_class=images_per_class,
            batches_per_epoch=1,
            world_size=world_size,
            unique_classes_per_rank=unique_classes_per_rank,
            section=section,
        )
    except ValueError as exc:
        detail = ""
        labels = np.asarray(labels_of_split)
        if class_names is not None and labels.size and np.issubdtype(labels.dtype, np.integer):
            present, counts = np.unique(labels, return_counts=True)
            fewest = present[counts == counts.min()]
            shown = ", ".join(f"{int(c)} = {class_names[int(c)]!r}" for c in fewest[:5])
            detail = f" (fewest labelled images, {int(counts.min())}: class {shown})"
        raise ValueError(f"{what}: {exc}{detail}") from None
