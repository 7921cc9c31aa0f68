"""Run directories: creation policy, resolved_config.yaml with provenance, and the metrics JSONL files."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from paws_cli.config import Settings, settings_to_yaml
from paws_cli.io_utils import atomic_write_text

CHECKPOINT = "checkpoint.pt"


class RunDirError(ValueError):
    """The run directory cannot be used as asked."""


def run_dir_of(settings: Settings, default_name: str) -> Path:
    return Path(settings.run.out_dir) / (settings.run.name or default_name)


def prepare_run_dir(path: Path, *, resume: bool, overwrite: bool) -> Path:
    """Create the run directory; refuse to train over an existing run unless resuming or overwriting."""
    checkpoint = path / CHECKPOINT
    if resume and not checkpoint.is_file():
        raise RunDirError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
    if not resume and not overwrite and (checkpoint.exists() or (path / "metrics.jsonl").exists()):
        raise RunDirError(
            f"run directory {path} already holds a run; pass --resume to continue it, --overwrite to start "
            "again in it, or choose another run.name"
        )
    path.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        for name in ("metrics.jsonl", "epochs.jsonl"):
            (path / name).unlink(missing_ok=True)
    return path


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
