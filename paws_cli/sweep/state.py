"""The files of a sweep directory (``run.out_dir/<sweep name>/``), which make a sweep resumable.

- ``sweep.json``: what the sweep is (recipe, swept keys, budget, metric); another sweep is refused in it;
- ``sweep.jsonl``: one record per finished trial (its overrides, validation result, training time);
- ``pending.json``: the trial being trained (``--trials``: the sampler's proposal is continued, not redrawn);
- ``selected.json``: the selected trial and its test result (computed once);
- ``sweep.md``: the table; ``<trial id>/``: each trial's ordinary run directory.

Every file is written atomically, so a sweep killed at any moment leaves whole files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from paws_cli.io_utils import atomic_write_text

__all__ = ["SweepDir"]

SPEC, RECORDS, PENDING, SELECTED, TABLE = (
    "sweep.json",
    "sweep.jsonl",
    "pending.json",
    "selected.json",
    "sweep.md",
)
#: Spec fields that must match for a sweep to be continued (the sampler and its trial count may change).
IDENTITY = ("recipe", "keys", "budget_s", "metric")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or remove it") from None


class SweepDir:
    """One sweep directory and its files (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def trial_dir(self, trial_id: str) -> Path:
        return self.path / trial_id

    def claim(self, spec: Mapping[str, Any], *, overwrite: bool) -> list[str]:
        """Make the directory this sweep's: refuse another sweep's (unless ``overwrite``, which clears it).
        Returns notes for the user (what --overwrite removed)."""
        if (self.path / "checkpoint.pt").exists():
            raise ValueError(
                f"{self.path} is a training run's directory, not a sweep's; choose another --name or run.out_dir"
            )
        notes: list[str] = []
        spec_path = self.path / SPEC
        if spec_path.is_file() and not overwrite:
            old = _read_json(spec_path)
            diff = [
                f"{k}: {old.get(k)!r} there, {spec.get(k)!r} now"
                for k in IDENTITY
                if old.get(k) != spec.get(k)
            ]
            if diff:
                raise ValueError(
                    f"{self.path} holds another sweep ({'; '.join(diff)}); choose another --name, or pass "
                    "--overwrite to delete its records and trial runs and start again"
                )
        if overwrite and self.path.exists():
            notes = self._clear()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(spec_path, json.dumps(dict(spec), indent=2) + "\n")
        return notes

    def _clear(self) -> list[str]:
        removed = []
        for name in (SPEC, RECORDS, PENDING, SELECTED, TABLE):
            if (self.path / name).exists():
                (self.path / name).unlink()
                removed.append(name)
        for child in sorted(self.path.iterdir()):
            if child.is_dir() and any(
                (child / f).exists() for f in ("checkpoint.pt", "resolved_config.yaml")
            ):
                shutil.rmtree(child)  # a trial's run directory (the sweep made it)
                removed.append(f"{child.name}/")
        return [f"--overwrite: removed {', '.join(removed)} from {self.path}"] if removed else []

    def records(self) -> list[dict[str, Any]]:
        """The finished trials' records, in the order they finished (a torn last line is ignored)."""
        path = self.path / RECORDS
        if not path.is_file():
            return []
        out = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(keepends=True), start=1):
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(
                    f"{path} line {number} is not JSON; fix or remove the line, then re-run"
                ) from None
        return out

    def append_record(self, record: Mapping[str, Any]) -> None:
        path = self.path / RECORDS
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        kept = old if old.endswith("\n") or not old else old[: old.rfind("\n") + 1]  # drop a torn line
        atomic_write_text(path, kept + json.dumps(dict(record), sort_keys=True) + "\n")
        (self.path / PENDING).unlink(missing_ok=True)

    def pending(self) -> dict[str, Any] | None:
        path = self.path / PENDING
        return _read_json(path) if path.is_file() else None

    def set_pending(self, trial: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / PENDING, json.dumps(dict(trial), indent=2) + "\n")

    def selected(self) -> dict[str, Any] | None:
        path = self.path / SELECTED
        return _read_json(path) if path.is_file() else None

    def set_selected(self, selected: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / SELECTED, json.dumps(dict(selected), indent=2) + "\n")

    def write_table(self, text: str) -> Path:
        atomic_write_text(self.path / TABLE, text)
        return self.path / TABLE
