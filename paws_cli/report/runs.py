"""Reading run directories for `paws report`, whatever state they are in.

A run directory may belong to a finished run, a run still training, or a killed one: every file is optional, a
torn last line of a JSONL log (the write a kill interrupted, or the one being written now) is skipped, and so is
any other line that is not a JSON object (counted, and named on the page: never dropped silently).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from paws_cli.config.trees import flatten_keys, lookup

#: Files that make a folder a run directory (any one of them).
RUN_FILES = ("metrics.jsonl", "epochs.jsonl", "resolved_config.yaml", "knn_eval.json", "finetune.json")

#: Settings that name where a run lives rather than what it trains: never used to tell runs apart.
PLACE_KEYS = ("run.name", "run.out_dir", "run.progress", "run.tensorboard")


@dataclass
class Jsonl:
    """The records of one JSONL log and how many lines were skipped (a torn last line included)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    torn_last_line: bool = False


@dataclass
class RunData:
    """What one run directory holds; absent files leave their fields empty."""

    path: Path
    settings: dict[str, Any] = field(default_factory=dict)  # resolved_config.yaml without its provenance
    steps: Jsonl = field(default_factory=Jsonl)  # metrics.jsonl
    epochs: Jsonl = field(default_factory=Jsonl)  # epochs.jsonl
    knn: dict[str, Any] | None = None  # knn_eval.json
    finetune: dict[str, Any] | None = None  # finetune.json (a fine-tuning run's own results)
    finetunes: list[RunData] = field(default_factory=list)  # fine-tuning runs of this run's checkpoint
    has_checkpoint: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        """'finetune' for a fine-tuning run (heldout_* in its epoch log or a finetune.json), else 'pretrain'."""
        if self.finetune is not None or any("heldout_top1" in r for r in self.epochs.records):
            return "finetune"
        return "pretrain"

    @property
    def method(self) -> str | None:
        value = self.settings.get("method")
        return str(value) if value is not None else None

    @property
    def flat_settings(self) -> dict[str, Any]:
        return {key: lookup(self.settings, key) for key in flatten_keys(self.settings)}

    def series(self, key: str, *, source: str = "steps") -> tuple[list[float], list[float]]:
        """(steps, values) of ``key`` in metrics.jsonl (source='steps') or epochs.jsonl, finite numbers only."""
        records = self.steps.records if source == "steps" else self.epochs.records
        xs, ys = [], []
        for record in records:
            x, y = record.get("step"), record.get(key)
            if _is_number(x) and _is_number(y) and math.isfinite(y):
                xs.append(float(x))
                ys.append(float(y))
        return xs, ys

    def status(self) -> str:
        """One line: how far the run got and whether it looks finished."""
        last = self.steps.records[-1] if self.steps.records else None
        parts = []
        if last is not None:
            epoch = f", epoch {last['epoch']}" if "epoch" in last else ""
            parts.append(f"last logged step {last.get('step')}{epoch}")
        if self.kind == "finetune" and self.finetune is not None:
            parts.append("finished (finetune.json written)")
        elif self.has_checkpoint:
            parts.append("checkpoint present")
        elif last is not None:
            parts.append("no checkpoint yet: still training, or stopped before its first checkpoint")
        if self.steps.torn_last_line or self.epochs.torn_last_line:
            parts.append("a torn last log line was skipped (killed mid-write, or being written)")
        bad = (
            self.steps.skipped + self.epochs.skipped - self.steps.torn_last_line - self.epochs.torn_last_line
        )
        if bad:
            parts.append(f"{bad} unreadable log line(s) skipped")
        return "; ".join(parts) or "no logs yet"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_jsonl(path: Path) -> Jsonl:
    """The JSON-object lines of ``path`` (an empty result when it is missing)."""
    out = Jsonl()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return out
    lines = text.split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        last = number == len(lines) - 1  # no newline after it: a write still under way, or cut by a kill
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or last:
            out.skipped += 1
            out.torn_last_line = out.torn_last_line or last
            continue
        out.records.append(record)
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # absent, or being rewritten by an older non-atomic writer
    return doc if isinstance(doc, dict) else None


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    if not isinstance(doc, dict):
        return {}
    doc.pop("provenance", None)
    return doc


def load_run(path: Path, *, find_finetunes: bool = True) -> RunData:
    """Read the run directory ``path``; a ValueError when it is not one (naming the files looked for)."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; pass a run directory such as runs/fmnist_demo")
    if not any((path / name).is_file() for name in RUN_FILES):
        raise ValueError(
            f"{path} is not a run directory: none of {', '.join(RUN_FILES)} is in it (pass the folder that "
            "`paws pretrain` or `paws finetune` wrote, e.g. runs/fmnist_demo)"
        )
    run = RunData(
        path=path,
        settings=_read_settings(path / "resolved_config.yaml"),
        steps=read_jsonl(path / "metrics.jsonl"),
        epochs=read_jsonl(path / "epochs.jsonl"),
        knn=_read_json(path / "knn_eval.json"),
        finetune=_read_json(path / "finetune.json"),
        has_checkpoint=(path / "checkpoint.pt").is_file(),
    )
    if find_finetunes and run.kind == "pretrain":
        run.finetunes = finetunes_of(path)
    return run


def finetunes_of(run_dir: Path) -> list[RunData]:
    """Fine-tuning runs beside ``run_dir`` whose finetune.json names its checkpoint (as the demo lays them out)."""
    checkpoint = (run_dir / "checkpoint.pt").resolve()
    found = []
    for candidate in sorted(run_dir.parent.glob("*/finetune.json")):
        doc = _read_json(candidate)
        if doc and _pretrained_checkpoint(doc, candidate.parent) == checkpoint:
            found.append(load_run(candidate.parent, find_finetunes=False))
    return found


def _pretrained_checkpoint(doc: dict[str, Any], finetune_dir: Path) -> Path | None:
    """The checkpoint a finetune.json names, resolved. A relative name was relative to the directory the
    fine-tuning ran in, which its recorded run_dir gives (e.g. runs/x_finetune, now found at /a/runs/x_finetune:
    it ran in /a), so the report finds it from any working directory."""
    pretrained = doc.get("pretrained")
    if not isinstance(pretrained, str):
        return None
    path = Path(pretrained)
    recorded = Path(str(doc.get("run_dir", "")))
    actual = finetune_dir.resolve()
    if not path.is_absolute() and not recorded.is_absolute() and recorded.parts:
        n = len(recorded.parts)
        if actual.parts[-n:] == recorded.parts:
            return (Path(*actual.parts[:-n]) / path).resolve()
    return path.resolve()


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def differing_settings(runs: list[RunData]) -> list[tuple[str, list[str]]]:
    """Settings whose values differ between ``runs`` (as text; '-' where a run lacks the key), method first."""
    flats = [r.flat_settings for r in runs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    keys = [k for k in keys if k == "method"] + [k for k in keys if k != "method"]
    rows = []
    for key in keys:
        values = [_format_value(flat[key]) if key in flat else "-" for flat in flats]
        if len(set(values)) > 1 and key not in PLACE_KEYS:
            rows.append((key, values))
    return rows


def legend_labels(runs: list[RunData], max_keys: int = 2) -> list[str]:
    """Names for the legends: the settings that tell the runs apart (``optim.lr=0.5``), at most ``max_keys``
    of them, leaving out keys some runs lack (another method's section: ``method=`` says it); the run
    directory's name when more settings differ, when none do, or when the names would not be distinct."""
    names = [r.name for r in runs]
    if len(runs) < 2:
        return names
    rows = [(k, v) for k, v in differing_settings(runs) if "-" not in v]
    if not rows or len(rows) > max_keys:
        return names
    labels = [", ".join(f"{key}={values[i]}" for key, values in rows) for i in range(len(runs))]
    return labels if len(set(labels)) == len(labels) else names
