"""The sidecar index of an FFCV ``.beton``: which source file and class each of its samples came from.

`paws convert-dataset imagefolder SRC OUT.beton` writes ``OUT.beton.index.json`` beside the .beton. An FFCV file
holds only pixels and integer labels; the sidecar keeps what the rest of the toolkit needs to treat it as the
ImageFolder it came from: the class folder names (label order = sorted, as torchvision's ImageFolder), the
relative path ``<class>/<file>`` of every sample in .beton order (so official split lists, which name files,
resolve to sample indices), the files skipped as unreadable, the writer settings and a content hash.

This module is the reader (and the one place that knows the JSON layout); it imports neither ``data_tools`` nor
``ffcv``, so the training runtime can use it anywhere. Where ffcv is importable, the .beton's sample count is read
with ffcv's own reader; otherwise from the .beton header directly (a fixed little-endian record).

Content hash (``content_hash``): ``sources`` = sha256 over the lines ``"<relative path>\\t<size in bytes>\\n"`` of
the written files, sorted by path (cheap: one ``stat`` per file, no modification times, so copying the source
tree elsewhere keeps it); ``beton`` = sha256 of the .beton's bytes, and ``beton_size`` its length.
:func:`read_sidecar` checks the size (free); :func:`verify_beton_hash` re-hashes the whole file (slow on ImageNet).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from paws_cli.io_utils import atomic_write_text

FORMAT_VERSION = "paws-ffcv-index/1"
SIDECAR_SUFFIX = ".index.json"
_HASH_CHUNK = 1 << 22

# ffcv's .beton header (format version 2): version u2, num_fields u2, page_size u4, num_samples u8,
# alloc_table_ptr u8, little-endian and C-aligned. Only used when ffcv itself is not importable.
_BETON_HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc", "<u8"),
    ],
    align=True,
)
_BETON_VERSION = 2


def sidecar_path(beton: str | os.PathLike[str]) -> Path:
    """``X.beton`` -> ``X.beton.index.json`` (the sidecar sits beside the .beton, its full name + suffix)."""
    beton = Path(beton)
    return beton.with_name(beton.name + SIDECAR_SUFFIX)


@dataclass(frozen=True)
class Sidecar:
    """A parsed and validated sidecar index (see the module docstring for the meaning of each field)."""

    beton: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    num_images: int
    source_root: str
    writer: dict[str, Any]
    content_hash: dict[str, Any]
    skipped: tuple[dict[str, str], ...] = ()
    created: str = ""
    toolkit_version: str = ""
    format_version: str = FORMAT_VERSION
    _by_path: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def path(self) -> Path:
        """The sidecar file itself."""
        return sidecar_path(self.beton)

    def labels_array(self) -> np.ndarray:
        """Labels as an int64 array, in .beton order."""
        return np.asarray(self.labels, dtype=np.int64)

    def index_of(self, relative_path: str) -> int:
        """The .beton index of ``<class>/<file>``; a KeyError names the file and the sidecar when absent."""
        if not self._by_path:
            self._by_path.update({name: i for i, name in enumerate(self.files)})
        try:
            return self._by_path[relative_path]
        except KeyError:
            raise KeyError(f"{relative_path!r} is not in the FFCV index {self.path}") from None


def _fail(index: Path, what: str) -> ValueError:
    return ValueError(
        f"malformed FFCV sidecar index {index}: {what}. Re-create it (and the .beton) with "
        "`paws convert-dataset imagefolder SRC_DIR OUT.beton`"
    )


def _str_list(doc: Mapping[str, Any], key: str, index: Path) -> tuple[str, ...]:
    value = doc.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(index, f"'{key}' must be a list of strings")
    return tuple(value)


def beton_num_samples(beton: str | os.PathLike[str]) -> int:
    """The number of samples an FFCV file declares (ffcv's reader when importable, else its header)."""
    beton = Path(beton)
    try:
        from ffcv.reader import Reader
    except ImportError:  # the runtime may read sidecars (make-splits) without the ffcv extra
        Reader = None
    try:
        if Reader is not None:
            return int(Reader(str(beton)).num_samples)
        header = np.fromfile(beton, dtype=_BETON_HEADER, count=1)
        if len(header) != 1 or int(header[0]["version"]) != _BETON_VERSION:
            raise ValueError("not an FFCV version-2 file header")
        return int(header[0]["num_samples"])
    except (AssertionError, ValueError, OSError, IndexError) as exc:
        raise ValueError(
            f"cannot read the FFCV file {beton} ({type(exc).__name__}: {exc}); it is not a complete .beton. "
            "Re-create it with `paws convert-dataset imagefolder SRC_DIR OUT.beton`"
        ) from exc


def read_sidecar(beton: str | os.PathLike[str], check_beton: bool = True) -> Sidecar:
    """Read and validate ``beton``'s sidecar index.

    Raises FileNotFoundError when the sidecar (or, with ``check_beton``, the .beton) is missing, ValueError
    when the JSON is malformed, inconsistent, or does not match the .beton (sample count, byte size).
    """
    beton = Path(beton)
    index = sidecar_path(beton)
    if not index.is_file():
        raise FileNotFoundError(
            f"FFCV file {beton} has no sidecar index {index}; re-run "
            f"`paws convert-dataset imagefolder SRC_DIR {beton}` to create both"
        )
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(index, f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise _fail(index, "the top level must be a JSON object")
    version = doc.get("format")
    if version != FORMAT_VERSION:
        raise _fail(index, f"format is {version!r}, this toolkit reads {FORMAT_VERSION!r}")

    classes = _str_list(doc, "classes", index)
    files = _str_list(doc, "files", index)
    labels = doc.get("labels")
    if not isinstance(labels, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels
    ):
        raise _fail(index, "'labels' must be a list of integers")
    num_images = doc.get("num_images")
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 0:
        raise _fail(index, f"'num_images' must be a non-negative integer, got {num_images!r}")
    if not (len(files) == len(labels) == num_images):
        raise _fail(index, f"num_images={num_images} but {len(files)} files and {len(labels)} labels")
    if list(classes) != sorted(set(classes)):
        raise _fail(index, "'classes' must be unique and sorted (ImageFolder label order)")
    for i, (name, label) in enumerate(zip(files, labels)):
        if not 0 <= label < len(classes):
            raise _fail(index, f"label {label} of entry {i} ({name!r}) is outside 0..{len(classes) - 1}")
        if name.split("/", 1)[0] != classes[label]:
            raise _fail(index, f"entry {i} {name!r} is not in its class folder {classes[label]!r}")
    if len(set(files)) != len(files):
        raise _fail(index, "'files' lists a file twice")

    skipped = doc.get("skipped", [])
    if not isinstance(skipped, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("reason"), str)
        for s in skipped
    ):
        raise _fail(index, "'skipped' must be a list of {file, reason} objects")
    writer = doc.get("writer", {})
    content_hash = doc.get("content_hash", {})
    if not isinstance(writer, dict) or not isinstance(content_hash, dict):
        raise _fail(index, "'writer' and 'content_hash' must be JSON objects")
    source_root = doc.get("source_root", "")
    if not isinstance(source_root, str):
        raise _fail(index, "'source_root' must be a string")

    if check_beton:
        if not beton.is_file():
            raise FileNotFoundError(
                f"the sidecar index {index} exists but its FFCV file {beton} does not; re-run "
                f"`paws convert-dataset imagefolder SRC_DIR {beton}`"
            )
        size = content_hash.get("beton_size")
        if isinstance(size, int) and beton.stat().st_size != size:
            raise ValueError(
                f"the FFCV file {beton} is {beton.stat().st_size} bytes but its sidecar index {index} records "
                f"{size}: the two belong to different conversions. Re-run `paws convert-dataset imagefolder`"
            )
        n = beton_num_samples(beton)
        if n != num_images:
            raise ValueError(
                f"the FFCV file {beton} holds {n} images but its sidecar index {index} lists {num_images}: "
                "the two belong to different conversions. Re-run `paws convert-dataset imagefolder`"
            )

    return Sidecar(
        beton=beton,
        classes=classes,
        files=files,
        labels=tuple(labels),
        num_images=num_images,
        source_root=source_root,
        writer=dict(writer),
        content_hash=dict(content_hash),
        skipped=tuple({"file": s["file"], "reason": s["reason"]} for s in skipped),
        created=str(doc.get("created", "")),
        toolkit_version=str(doc.get("toolkit_version", "")),
        format_version=version,
    )


def hash_sources(entries: Iterable[tuple[str, int]]) -> str:
    """sha256 over sorted ``"<relative path>\\t<size>\\n"`` lines (see the module docstring)."""
    digest = hashlib.sha256()
    for rel, size in sorted(entries):
        digest.update(f"{rel}\t{int(size)}\n".encode())
    return digest.hexdigest()


def hash_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_beton_hash(sidecar: Sidecar) -> None:
    """Re-hash the .beton and compare with the sidecar; ValueError on a mismatch (reads the whole file)."""
    expected = sidecar.content_hash.get("beton")
    if not isinstance(expected, str):
        raise ValueError(f"the sidecar index {sidecar.path} records no .beton hash (content_hash.beton)")
    actual = hash_file(sidecar.beton)
    if actual != expected:
        raise ValueError(
            f"the FFCV file {sidecar.beton} has sha256 {actual} but its sidecar index records {expected}: "
            "the file changed after conversion. Re-run `paws convert-dataset imagefolder`"
        )


def write_sidecar(
    beton: str | os.PathLike[str],
    *,
    source_root: str,
    classes: Sequence[str],
    files: Sequence[str],
    labels: Sequence[int],
    skipped: Sequence[Mapping[str, str]],
    writer: Mapping[str, Any],
    content_hash: Mapping[str, Any],
    created: str,
    toolkit_version: str,
) -> Path:
    """Write ``beton``'s sidecar index atomically (the JSON layout :func:`read_sidecar` expects)."""
    doc = {
        "format": FORMAT_VERSION,
        "source_root": source_root,
        "num_images": len(files),
        "classes": list(classes),
        "files": list(files),
        "labels": [int(v) for v in labels],
        "skipped": [{"file": str(s["file"]), "reason": str(s["reason"])} for s in skipped],
        "writer": dict(writer),
        "content_hash": dict(content_hash),
        "created": created,
        "toolkit_version": toolkit_version,
    }
    path = sidecar_path(beton)
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return path
