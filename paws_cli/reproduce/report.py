"""The report of `paws reproduce`: our numbers beside the paper's, as Markdown (and JSON for scripts).

Every published cell is shown with our top-1 read from its result file (knn_eval.json: ``paws_nn_top1``;
finetune.json: ``test_top1``) and the difference ours - paper in points. A cell without a result reads
"not run", or "failed" when its step, or one it needs, failed in this invocation; a cell the toolkit cannot
reproduce reads its reason (SemPPL's SK rows: "not reproducible: no SK backbone in the toolkit"). Written atomically to
``OUT/<table>.md`` and ``OUT/<table>.json`` (``<table>_smoke.*`` for the smoke scale, so that a smoke run
never overwrites a real report), with the figures the Markdown shows: ``<table>_bars.png`` (ours against the
paper, per cell) and, for Table 1, ``<table>_epochs.png`` (top-1 against pretraining epochs beside the paper's
Figure 1 points; see :mod:`paws_cli.reproduce.figures`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paws_cli.io_utils import atomic_path, atomic_write_text
from paws_cli.reproduce.figures import bars_figure, epochs_figure
from paws_cli.reproduce.paper import PAPERS, SOURCES, TITLES
from paws_cli.reproduce.plan import Plan, PlannedCell
from paws_cli.reproduce.runner import StepOutcome

NOT_RUN = "not run"
FAILED = "failed"


@dataclass(frozen=True)
class CellResult:
    """A published cell with our value (None when missing) and why it is missing."""

    planned: PlannedCell
    ours: float | None
    missing: str = ""  # NOT_RUN, FAILED or the cell's own reason (Cell.unavailable) when ours is None

    @property
    def difference(self) -> float | None:
        """Ours minus the paper's, in points."""
        return None if self.ours is None else self.ours - self.planned.cell.paper_top1


def _read_value(path: Path, key: str) -> float | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = doc.get(key) if isinstance(doc, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def collect(plan: Plan, outcomes: Sequence[StepOutcome] = ()) -> list[CellResult]:
    """Our value of every cell of the plan, read from the result files that exist now."""
    by_step = {o.step: o.outcome for o in outcomes}
    failed: set[str] = set()  # steps that failed, and steps blocked by one (not by a step still waiting)
    for step in plan.steps:
        outcome = by_step.get(step.id)
        if outcome == "failed" or (outcome == "blocked" and failed.intersection(step.needs)):
            failed.add(step.id)
    results = []
    for planned in plan.cells:
        if planned.result is None:  # nothing the toolkit can run reproduces it
            results.append(CellResult(planned, None, planned.cell.unavailable))
            continue
        value = _read_value(planned.result, planned.key) if planned.result.is_file() else None
        missing = "" if value is not None else (FAILED if planned.step in failed else NOT_RUN)
        results.append(CellResult(planned, value, missing))
    return results


def report_paths(plan: Plan) -> tuple[Path, Path]:
    """The Markdown and JSON report files of ``plan``."""
    stem = plan.options.table + ("_smoke" if plan.options.scale == "smoke" else "")
    return plan.options.out / f"{stem}.md", plan.options.out / f"{stem}.json"


def _fmt(value: float | None, missing: str, signed: bool = False) -> str:
    if value is None:
        return missing
    return f"{value:+.1f}" if signed else f"{value:.2f}"


def render_markdown(
    plan: Plan,
    results: Sequence[CellResult],
    now: dt.datetime | None = None,
    figures: Sequence[tuple[str, str]] = (),
) -> str:
    """The report as Markdown: one row per (architecture, method, epochs), the 1% and 10% columns side by side;
    then ``figures``, (caption, PNG file name beside the report) pairs."""
    opts = plan.options
    now = now or dt.datetime.now(dt.timezone.utc)
    rows: dict[tuple[str, str, int], dict[str, CellResult]] = {}
    for result in results:
        cell = result.planned.cell
        rows.setdefault((cell.architecture, cell.label, cell.epochs), {})[cell.fraction] = result
    fractions = sorted({r.planned.cell.fraction for r in results}, key=lambda f: float(f.rstrip("%")))
    nn = any(r.planned.cell.metric == "paws_nn" for r in results)
    header = ["architecture", "method", "epochs"]
    for f in fractions:
        header += [f"{f} paper", f"{f} ours", f"{f} ours - paper"]
    lines = [
        f"# Reproduction of the {PAPERS[opts.table]} paper's {TITLES[opts.table]}",
        "",
        f"Written by `paws reproduce {opts.table} --scale {opts.scale}` on {now:%Y-%m-%d %H:%M} UTC; "
        f"work folder `{opts.work}`; pretraining data format `{opts.data_format}`.",
        "",
    ]
    if opts.scale == "smoke":
        lines += [
            "**Smoke scale**: the same pipeline on a tiny generated ImageNet-layout folder with a small network "
            "for a fraction of an epoch. These numbers check that every step runs; they are not comparable "
            "with the paper's.",
            "",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (arch, method, epochs), by_fraction in rows.items():
        row = [arch, method, str(epochs)]
        for f in fractions:
            result = by_fraction.get(f)
            if result is None:
                row += ["-", "-", "-"]
                continue
            row += [
                f"{result.planned.cell.paper_top1:.1f}",
                _fmt(result.ours, result.missing),
                _fmt(result.difference, "", signed=True),
            ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Paper: {SOURCES[opts.table]}. Ours: top-1 % on the 50,000 ImageNet "
        "validation images; fine-tuned numbers are at the epoch selected on the held-out val.txt"
        + (", PAWS-NN is the soft nearest neighbour over the labelled list" if nn else "")
        + ". 'not run': no result yet; 'failed': its step or one it needs failed (see the logs).",
        "",
    ]
    for caption, name in figures:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    lines += [
        "Result files:",
        "",
    ]
    lines += [
        f"- {r.planned.cell.run_name} {r.planned.cell.metric}: `{r.planned.result}`"
        for r in results
        if r.planned.result is not None
    ]
    if plan.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in plan.notes]
    return "\n".join(lines) + "\n"


def render_json(plan: Plan, results: Sequence[CellResult]) -> dict[str, Any]:
    """The same content as a JSON-ready dict."""
    return {
        "table": plan.options.table,
        "scale": plan.options.scale,
        "work": str(plan.options.work),
        "data_format": plan.options.data_format,
        "cells": [
            {
                "architecture": r.planned.cell.architecture,
                "method": r.planned.cell.method,
                "recipe": r.planned.cell.recipe if r.planned.result is not None else None,
                "epochs": r.planned.cell.epochs,
                "labels": r.planned.cell.fraction,
                "metric": r.planned.cell.metric,
                "paper_top1": r.planned.cell.paper_top1,
                "ours_top1": r.ours,
                "difference": r.difference,
                "missing": r.missing or None,
                "result_file": None if r.planned.result is None else str(r.planned.result),
            }
            for r in results
        ],
    }


def write_report(plan: Plan, outcomes: Sequence[StepOutcome] = ()) -> tuple[Path, list[CellResult]]:
    """Write the Markdown and JSON reports; return the Markdown path and the cells."""
    results = collect(plan, outcomes)
    md, js = report_paths(plan)
    md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(md, render_markdown(plan, results, figures=write_figures(plan, results)))
    atomic_write_text(js, json.dumps(render_json(plan, results), indent=2) + "\n")
    return md, results


def write_figures(plan: Plan, results: Sequence[CellResult]) -> list[tuple[str, str]]:
    """The report's PNGs beside it (written atomically): ours against the paper's per cell, and for Table 1
    fine-tuned top-1 against pretraining epochs with the paper's Figure 1 points. (caption, file name) pairs."""
    md, _ = report_paths(plan)
    figures = [
        (
            "bars",
            "Ours (blue) against the paper (grey), top-1 % per published cell",
            bars_figure(results, _figure_title(plan)),
        ),
        (
            "epochs",
            "Fine-tuned top-1 against pretraining epochs: the paper's points (Figure 1 at 10% labels, Table 1) "
            "and ours, each point the end of its own run (no run evaluates during pretraining)",
            epochs_figure(results),
        ),
    ]
    written = []
    for suffix, caption, figure in figures:
        if figure is None:
            continue
        name = f"{md.stem}_{suffix}.png"
        with atomic_path(md.parent / name) as tmp:
            figure.savefig(tmp, format="png", dpi=110)
        written.append((caption, name))
    return written


def _figure_title(plan: Plan) -> str:
    smoke = " (smoke scale: not comparable)" if plan.options.scale == "smoke" else ""
    return f"{PAPERS[plan.options.table]} paper, {TITLES[plan.options.table]}{smoke}"
