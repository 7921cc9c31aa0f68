"""`paws convert-dataset imagefolder SRC_DIR OUT.beton`: an ImageNet-layout folder -> an FFCV file + sidecar index.

Classes and files follow torchvision's ImageFolder exactly (its own ``find_classes``/``make_dataset``: class =
sorted folder name, files sorted, the same image extensions), so label ``i`` means the same class on the folder
path and the FFCV path. Each image is decoded by PIL by content (a PNG named ``.JPEG`` is fine), converted with
``Image.convert("RGB")`` (CMYK, grayscale, palette, RGBA), without EXIF rotation (as ImageFolder), and handed to
FFCV's ``RGBImageField``, which resizes it so its longer side is at most ``max_resolution`` (OpenCV area
interpolation, never upscaling) and stores it raw or as JPEG per ``write_mode``.

Two passes, both in worker processes:

1. check: every file is opened, fully decoded and converted. Unreadable files (truncated, empty, not an image,
   a mode PIL cannot convert) are skipped and reported, or stop the conversion with an error naming the file
   (``on_bad_file``). FFCV's writer then never sees a file it would fail on: its worker processes die on an
   exception and its main loop then waits forever, which is why this pass exists.
2. write: FFCV's ``DatasetWriter`` runs in a child process (its own process group) so that the main process can
   show a rich progress bar, watch FFCV's workers (one killed by the OOM killer would otherwise hang the run
   forever) and stop everything cleanly on an error or Ctrl-C.

The .beton is written under a temporary name in the output folder and renamed at the end: an interrupted run
leaves no half-written file under the final name. The sidecar index (:mod:`paws_cli.data.backends.sidecar`) is written
right after the rename; a stale sidecar of an older conversion is removed before it.
"""

from __future__ import annotations

import importlib.metadata
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageFile

from paws_cli import __version__
from paws_cli.data.backends import sidecar as sc
from paws_cli.io_utils import atomic_path

WriteMode = Literal["raw", "jpg", "smart", "proportion"]
BadFilePolicy = Literal["skip", "stop"]
WRITE_MODES: tuple[str, ...] = ("raw", "jpg", "smart", "proportion")
BAD_FILE_POLICIES: tuple[str, ...] = ("skip", "stop")
#: write_mode=smart without --smart-threshold: images above this many raw bytes (256x256 RGB) become JPEG.
DEFAULT_SMART_THRESHOLD = 256 * 256 * 3

_MIN_PAGE = 1 << 23  # FFCV's default page (8 MiB); larger only when one stored image needs it
_MAX_PAGE = 1 << 31  # FFCV's page offsets are uint32
_POLL_S = 0.1

FFCV_MISSING = (
    "FFCV is not installed in this environment, and writing a .beton needs it. Install the project's ffcv extra: "
    "`make setup` does (it needs the Debian packages pkg-config g++ libturbojpeg0-dev libopencv-dev), or, once "
    "those are installed, `python -m pip install -c constraints.txt ffcv==1.0.2`. "
    "Without FFCV, train from the folder itself with data.format=folder"
)


@dataclass
class ConversionResult:
    """What a conversion wrote; ``skipped`` lists ``{file, reason}`` for every unreadable file."""

    beton: Path
    sidecar: Path
    num_images: int
    classes: list[str]
    skipped: list[dict[str, str]]
    beton_bytes: int
    seconds: float
    writer: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- decoding


def decode_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file by content and return it as an (H, W, 3) uint8 RGB array (see module docstring)."""
    with Image.open(path) as image:
        image.load()  # decodes every byte now: a truncated file fails here, not later in a worker
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return np.array(rgb, dtype=np.uint8, copy=True)


def _init_check_worker() -> None:
    # A process-wide PIL switch; truncated files must fail, whatever the parent process had set.
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _check_file(item: tuple[int, str]) -> tuple[int, int, int, int, str | None]:
    """-> (index, width, height, size in bytes, None) or (index, 0, 0, 0, reason) for an unreadable file."""
    index, path = item
    try:
        size = os.stat(path).st_size
        array = decode_rgb(path)
    except Exception as exc:  # any failure means the file is unusable; the reason goes into the report
        return index, 0, 0, 0, f"{type(exc).__name__}: {exc}".strip()
    return index, int(array.shape[1]), int(array.shape[0]), size, None


def stored_size(width: int, height: int, max_resolution: int | None) -> tuple[int, int]:
    """(width, height) that FFCV's RGBImageField stores: the longer side shrunk to max_resolution, truncated."""
    if not max_resolution:
        return width, height
    ratio = max_resolution / max(width, height)
    if ratio >= 1:
        return width, height
    return int(ratio * width), int(ratio * height)


def page_size_for(max_raw_bytes: int) -> int:
    """FFCV page size (a power of two) that holds the largest stored image, raw or JPEG, with room to spare.

    FFCV's writer cannot split a sample across pages and its worker dies when one does not fit. A JPEG can
    exceed the raw size for noise-like images, hence the factor 2 plus a margin for headers.
    """
    need = 2 * max_raw_bytes + (1 << 16)
    page = _MIN_PAGE
    while page < need:
        page <<= 1
    if page >= _MAX_PAGE:
        raise ValueError(
            f"an image needs {max_raw_bytes} bytes stored, more than an FFCV page can hold; "
            "pass a smaller --max-resolution"
        )
    return page


# ----------------------------------------------------------------------------------------------- scanning


def scan_imagefolder(src: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(absolute path, label)]) exactly as torchvision's ImageFolder; clear errors otherwise."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not src.exists():
        raise FileNotFoundError(f"the image folder {src} does not exist")
    if not src.is_dir():
        raise NotADirectoryError(
            f"{src} is not a folder: give the ImageFolder train root (one folder per class)"
        )
    subdirs = sorted(p.name for p in src.iterdir() if p.is_dir())
    split_like = subdirs and set(subdirs) <= {"train", "val", "test"}
    if split_like and any(p.is_dir() for d in subdirs for p in (src / d).iterdir()):
        raise ValueError(
            f"{src} holds the split folders {subdirs}, not class folders; convert each split on its own, "
            f"e.g. `paws convert-dataset imagefolder {src / 'train'} train.beton`"
        )
    try:
        classes, class_to_idx = find_classes(src)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the image folder {src} has no class folders: expected {src}/<class>/<image> (ImageNet layout)"
        ) from None
    counts = dict.fromkeys(classes, 0)
    samples = make_dataset(str(src), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    for _, label in samples:
        counts[classes[label]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise ValueError(
            f"{len(empty)} class folder(s) of {src} hold no images ({shown}); images need one of the "
            f"extensions {', '.join(IMG_EXTENSIONS)}. Remove the empty folders or add their images"
        )
    return classes, samples


# ----------------------------------------------------------------------------------------------- writing


class _BetonSource:
    """The indexed dataset FFCV's writer reads, in its worker processes: (RGB array, label) per sample.

    It never raises: an exception would kill FFCV's worker and hang the writer. A file that fails now (it
    changed after the check pass) is reported on ``failures`` and replaced by a 1x1 placeholder; the parent
    then aborts the conversion, so no placeholder ever reaches a final .beton.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], counter: Any, failures: Any) -> None:
        self.paths = list(paths)
        self.labels = [int(v) for v in labels]
        self.counter = counter
        self.failures = failures

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            image = load_for_writing(self.paths[index])
        except Exception as exc:  # reported, see the class docstring
            self.failures.put((self.paths[index], f"{type(exc).__name__}: {exc}"))
            image = np.zeros((1, 1, 3), dtype=np.uint8)
        with self.counter.get_lock():
            self.counter.value += 1
        return image, self.labels[index]


def load_for_writing(path: str) -> np.ndarray:
    """The write pass's decoder (the same as the check pass's; a separate name so tests can break one)."""
    return decode_rgb(path)


def _run_ffcv_writer(
    tmp: str, fields: dict[str, Any], page_size: int, workers: int, source: _BetonSource, status: Any
) -> None:
    """Child-process body: run FFCV's DatasetWriter and watch its worker processes."""
    os.setpgrp()  # the parent stops the whole group (FFCV's workers too) on error or Ctrl-C
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    from tqdm import tqdm

    # FFCV draws its own tqdm bar; the parent draws a rich one from the shared counter instead.
    ffcv.writer.tqdm = lambda *a, **k: tqdm(*a, **{**k, "disable": True})
    # Keep FFCV's worker Process objects: their exit codes are the only sign of a worker that died
    # (mp.active_children() forgets a finished process before a poll could see it).
    started: list[Any] = []

    class TrackedProcess(ffcv.writer.Process):  # type: ignore[misc, name-defined]
        def start(self) -> None:
            super().start()
            started.append(self)

    ffcv.writer.Process = TrackedProcess
    writer = ffcv.writer.DatasetWriter(
        tmp,
        {"image": RGBImageField(**fields), "label": IntField()},
        page_size=page_size,
        num_workers=workers,
    )

    def watch() -> None:
        # FFCV's main loop waits forever for a worker that died; notice it and end this process instead.
        while True:
            dead = [p for p in list(started) if p.exitcode not in (None, 0)]
            if dead:
                codes = ", ".join(str(p.exitcode) for p in dead)
                _report_and_exit(
                    status,
                    3,
                    f"an FFCV writer worker process died (exit code {codes}; negative = killed by that signal, "
                    "-9 is usually the out-of-memory killer). Use fewer --workers or a smaller --max-resolution",
                )
            time.sleep(_POLL_S)

    # The writer forks its workers from this (main) thread, as numba's threading layer wants; the watcher is
    # a daemon thread that only reads process state.
    threading.Thread(target=watch, daemon=True).start()
    try:
        writer.from_indexed_dataset(source)
    except BaseException as exc:  # reported to the parent, which turns it into a clear error
        _report_and_exit(status, 4, f"FFCV's writer failed: {type(exc).__name__}: {exc}")


def _report_and_exit(status: Any, code: int, message: str) -> None:
    status.put(message)
    status.close()
    status.join_thread()
    os._exit(code)  # from any thread, without waiting for FFCV's (possibly stuck) workers


def _drain(q: Any) -> list[Any]:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def _stop_group(proc: Any) -> None:
    """Kill the writer child and its FFCV workers (its process group), then reap the child."""
    if proc.pid is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    proc.join()


def _progress(enabled: bool, console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # auto_refresh=False: no refresh thread, so forking worker processes is safe; the poll loops refresh.
    return Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        auto_refresh=False,
        disable=not enabled,
    )


# ----------------------------------------------------------------------------------------------- the command


def _validate_args(
    max_resolution: int | None,
    jpeg_quality: int,
    write_mode: str,
    compress_probability: float,
    smart_threshold: int | None,
    workers: int | None,
    on_bad_file: str,
) -> int:
    if write_mode not in WRITE_MODES:
        raise ValueError(f"--write-mode {write_mode!r} is not one of {', '.join(WRITE_MODES)}")
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(f"--on-bad-file {on_bad_file!r} is not one of {', '.join(BAD_FILE_POLICIES)}")
    if max_resolution is not None and max_resolution < 0:
        raise ValueError(f"--max-resolution must be positive (or 0 to keep sizes), got {max_resolution}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be within 1..100, got {jpeg_quality}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"--compress-probability must be within 0..1, got {compress_probability}")
    if smart_threshold is not None and smart_threshold < 0:
        raise ValueError(f"--smart-threshold must be a byte count >= 0, got {smart_threshold}")
    if workers is None:
        return max(
            1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    return workers


def _check_files(
    samples: Sequence[tuple[str, int]], src: Path, workers: int, on_bad_file: str, progress: Any
) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Check pass: -> (per-sample [width, height, bytes] with 0 rows for bad files, skipped list)."""
    info = np.zeros((len(samples), 3), dtype=np.int64)
    skipped: list[dict[str, str]] = []
    task = progress.add_task("checking", total=len(samples))
    chunk = max(1, min(64, len(samples) // (workers * 16) or 1))
    last = 0.0
    with mp.get_context("fork").Pool(workers, initializer=_init_check_worker) as pool:
        items = ((i, path) for i, (path, _) in enumerate(samples))
        for n, (i, width, height, size, reason) in enumerate(
            pool.imap(_check_file, items, chunksize=chunk), 1
        ):
            if reason is not None:
                rel = Path(os.path.relpath(samples[i][0], src)).as_posix()
                if on_bad_file == "stop":
                    pool.terminate()
                    raise ValueError(
                        f"cannot read the image {samples[i][0]} ({reason}); fix or remove it, or pass "
                        "--on-bad-file skip to leave unreadable files out (they are listed in the sidecar index)"
                    )
                skipped.append({"file": rel, "reason": reason})
            else:
                info[i] = (width, height, size)
            if time.monotonic() - last > _POLL_S or n == len(samples):
                progress.update(task, completed=n)
                progress.refresh()
                last = time.monotonic()
    return info, skipped


def _write_beton(
    tmp: Path,
    paths: list[str],
    labels: list[int],
    fields: dict[str, Any],
    page_size: int,
    workers: int,
    progress: Any,
) -> None:
    """Write pass: FFCV's writer in a child process; raises on any failure (the caller removes ``tmp``)."""
    ctx = mp.get_context("fork")  # FFCV's writer hands unpicklable state to its workers: it needs fork
    counter = ctx.Value("Q", 0)
    failures = ctx.Queue()
    status = ctx.Queue()
    source = _BetonSource(paths, labels, counter, failures)
    proc = ctx.Process(
        target=_run_ffcv_writer, args=(str(tmp), fields, page_size, workers, source, status), daemon=False
    )
    task = progress.add_task("writing", total=len(paths))
    proc.start()

    def check_failures() -> None:
        failed = _drain(failures)
        if failed:
            path, reason = failed[0]
            raise ValueError(
                f"the image {path} passed the check but could not be read while writing ({reason}); did the "
                "folder change during the conversion? Nothing was written; run the conversion again"
            )

    try:
        while proc.exitcode is None:
            proc.join(_POLL_S)
            check_failures()  # at once: a placeholder image must never reach the final file
            progress.update(task, completed=min(counter.value, len(paths)))
            progress.refresh()
        check_failures()  # a report flushed just before the writer exited
        messages = _drain(status)
        if proc.exitcode != 0:
            why = messages[0] if messages else f"the FFCV writer process exited with code {proc.exitcode}"
            raise ValueError(f"writing the FFCV file failed: {why}. Nothing was written")
    finally:
        if proc.exitcode != 0:  # still running, or died leaving FFCV workers behind in its group
            _stop_group(proc)
        for q in (failures, status):
            q.close()
            q.cancel_join_thread()


def convert_imagefolder(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_resolution: int | None = 512,
    jpeg_quality: int = 90,
    write_mode: WriteMode | str = "jpg",
    compress_probability: float = 0.5,
    smart_threshold: int | None = None,
    workers: int | None = None,
    on_bad_file: BadFilePolicy | str = "skip",
    overwrite: bool = False,
    progress: bool = True,
    console: Any = None,
) -> ConversionResult:
    """Convert the ImageFolder train root ``src`` into the FFCV file ``out`` and its sidecar index.

    max_resolution: longer side of the stored images (FFCV's RGBImageField; 0/None keeps every size).
    write_mode: raw (pixels), jpg (JPEG at jpeg_quality), smart (JPEG above smart_threshold raw bytes, else
    raw), proportion (JPEG with probability compress_probability). Bad files: on_bad_file skip|stop.
    """
    started = time.monotonic()
    workers = _validate_args(
        max_resolution, jpeg_quality, write_mode, compress_probability, smart_threshold, workers, on_bad_file
    )
    src, out = Path(src), Path(out)
    if out.suffix != ".beton":
        raise ValueError(f"the output {out} must be a .beton file name")
    if out.is_dir():
        raise ValueError(f"the output {out} is a folder; give a file name such as {out / 'train.beton'}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it (and its sidecar index)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the output folder {out.parent} does not exist; create it first")
    try:
        import ffcv  # noqa: F401  (only to fail early, before the check pass)
    except ImportError as exc:
        raise ValueError(f"{FFCV_MISSING} ({exc})") from None

    # Absolute but not resolved: class folders are often symlinks, and relative names must stay "<class>/<file>".
    src = Path(os.path.abspath(src))
    classes, samples = scan_imagefolder(src)
    if max_resolution == 0:
        max_resolution = None
    if write_mode == "smart" and smart_threshold is None:
        smart_threshold = DEFAULT_SMART_THRESHOLD

    with _progress(progress, console) as bar:
        info, skipped = _check_files(samples, src, workers, on_bad_file, bar)
        keep = np.flatnonzero(info[:, 0] > 0)
        kept_labels = np.asarray([samples[i][1] for i in keep], dtype=np.int64)
        lost = [c for label, c in enumerate(classes) if not np.any(kept_labels == label)]
        if lost:
            raise ValueError(
                f"every image of the class folder(s) {', '.join(lost)} in {src} is unreadable (see the reasons "
                "with --on-bad-file stop); fix or remove those folders"
            )
        paths = [samples[i][0] for i in keep]
        files = [Path(os.path.relpath(p, src)).as_posix() for p in paths]
        stored = [stored_size(int(w), int(h), max_resolution) for w, h in info[keep, :2]]
        page_size = page_size_for(max(w * h * 3 for w, h in stored))
        fields = {
            "write_mode": write_mode,
            "max_resolution": max_resolution,
            "smart_threshold": smart_threshold,
            "jpeg_quality": jpeg_quality,
            "compress_probability": compress_probability,
        }
        with atomic_path(out) as tmp:
            _write_beton(tmp, paths, kept_labels.tolist(), fields, page_size, workers, bar)
            written = sc.beton_num_samples(tmp)
            if written != len(paths):
                raise ValueError(f"FFCV wrote {written} samples instead of {len(paths)}; nothing was written")
            hash_task = bar.add_task("hashing", total=None)
            beton_hash = sc.hash_file(tmp)
            bar.update(hash_task, total=1, completed=1)
            bar.refresh()
            beton_bytes = tmp.stat().st_size
            sc.sidecar_path(out).unlink(missing_ok=True)  # an old index must never describe the new file
    writer = {
        **fields,
        "max_resolution": max_resolution or 0,
        "page_size": page_size,
        "fields": {"image": "RGBImageField", "label": "IntField"},
        "decode": "PIL Image.open by content, Image.convert('RGB'), no EXIF rotation",
        "on_bad_file": on_bad_file,
        "ffcv_version": importlib.metadata.version("ffcv"),
    }
    content_hash = {
        "algorithm": "sha256",
        "sources": sc.hash_sources((f, int(info[i, 2])) for f, i in zip(files, keep)),
        "beton": beton_hash,
        "beton_size": beton_bytes,
        "covers": "sources: sorted '<relative path>\\t<bytes>' lines of the written files; beton: the .beton bytes",
    }
    index = sc.write_sidecar(
        out,
        source_root=str(src),
        classes=classes,
        files=files,
        labels=kept_labels.tolist(),
        skipped=skipped,
        writer=writer,
        content_hash=content_hash,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        toolkit_version=__version__,
    )
    return ConversionResult(
        beton=out,
        sidecar=index,
        num_images=len(files),
        classes=list(classes),
        skipped=skipped,
        beton_bytes=beton_bytes,
        seconds=time.monotonic() - started,
        writer=writer,
    )
