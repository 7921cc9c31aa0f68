"""Run directories: creation policy, resolved_config.yaml with provenance, and the metrics JSONL files."""

from __future__ import annotations

import errno
import json
import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from paws_cli.config import Settings, settings_to_yaml
from paws_cli.io_utils import atomic_write_text

try:  # POSIX advisory locks; where fcntl is missing (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
#: The logs a run appends to; a resumed run drops their records beyond its checkpoint's step.
LOGS = ("metrics.jsonl", "epochs.jsonl")


class RunDirError(ValueError):
    """The run directory cannot be used as asked."""


def run_dir_of(settings: Settings, default_name: str) -> Path:
    return Path(settings.run.out_dir) / (settings.run.name or default_name)


# Run directories locked by this process, by resolved path. The kernel drops a flock when its process dies
# (SIGKILL included), so a lock never outlives its run; within one process a second `train` call on the same
# directory (tests, a notebook after a failed run) reuses the lock instead of refusing itself.
_HELD: dict[Path, IO[str]] = {}


def _acquire_lock(path: Path) -> bool:
    """Lock `path` for this process; True when newly acquired, False when this process already held it (or
    the file system cannot lock). Raises RunDirError when another live process holds it."""
    key = path.resolve()
    if key in _HELD or fcntl is None:
        return False
    fh = (path / LOCK).open("a+", encoding="utf-8")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # The file system cannot lock (e.g. Lustre mounted without flock): run unlocked rather than refuse.
            fh.close()
            return False
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RunDirError(
            f"run directory {path} is in use by a running job ({holder}); two runs must not write to one "
            "directory. Wait for it to end (or stop it), or choose another run.name"
        ) from None
    fh.seek(0)
    fh.truncate()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
    fh.flush()
    _HELD[key] = fh
    return True


def release_run_dir(path: Path) -> None:
    """Give up this process's lock on `path` (no-op when it holds none)."""
    fh = _HELD.pop(path.resolve(), None)
    if fh is not None:
        fh.close()  # closing the file releases the flock


def prepare_run_dir(path: Path, *, resume: bool, overwrite: bool, lock: bool = False) -> Path:
    """Create the run directory; refuse to train over an existing run unless resuming or overwriting.

    A directory that another live process has locked is refused whatever the flags. lock=True keeps this
    process's lock until `release_run_dir` (the training loop); otherwise the lock is only checked (e.g. when
    submitting a job that will lock it itself). Temporary files of a checkpoint write that a killed run left
    behind are removed.
    """
    checkpoint = path / CHECKPOINT
    if resume and not checkpoint.is_file():
        raise RunDirError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} is a file; choose another run.name or run.out_dir")
    path.mkdir(parents=True, exist_ok=True)
    acquired = _acquire_lock(path)
    try:
        if not resume and not overwrite and (checkpoint.exists() or (path / "metrics.jsonl").exists()):
            raise RunDirError(
                f"run directory {path} already holds a run; pass --resume to continue it, --overwrite to start "
                "again in it, or choose another run.name"
            )
        if overwrite and not resume:
            for name in LOGS:
                (path / name).unlink(missing_ok=True)
        # atomic_path names its temporaries .STEM.RANDOM.tmpSUFFIX; under the lock nobody else is writing.
        for stale in path.glob(".*.tmp.*"):
            stale.unlink(missing_ok=True)
    except BaseException:
        if acquired:
            release_run_dir(path)
        raise
    if acquired and not lock:
        release_run_dir(path)
    return path


def trim_logs(path: Path, last_step: int) -> None:
    """Drop log records beyond `last_step` (and a torn last line) from a run's JSONL logs before resuming.

    A run killed after its last checkpoint logged steps that the resumed run trains again; without this
    they would appear twice.
    """
    for name in LOGS:
        log = path / name
        if not log.is_file():
            continue
        kept = []
        for line in log.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # the write the kill interrupted
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise RunDirError(
                    f"{log} has a line that is not JSON ({line[:80]!r}); fix or remove the line, then resume"
                ) from None
            if int(record.get("step", 0)) <= last_step:
                kept.append(line)
        atomic_write_text(log, "".join(kept))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance() -> dict[str, Any]:
    versions = {}
    for package in ("paws-cli", "torch", "torchvision", "timm", "numpy", "pydantic"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "versions": versions,
    }


def write_resolved_config(path: Path, settings: Settings) -> Path:
    target = path / "resolved_config.yaml"
    atomic_write_text(target, settings_to_yaml(settings, provenance()))
    return target


class JsonlWriter:
    """Append-only JSON lines, flushed per record so a killed run keeps what it logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
