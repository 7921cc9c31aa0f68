"""`paws sweep`: train one ordinary run per trial, score it on the validation split, select, test once.

1. The trials: the full grid of the axes, or with ``trials`` N proposals of optuna's TPE sampler over them
   (:mod:`paws_cli.sweep.sampler`). Every trial's settings are resolved before anything trains.
2. Each trial is ``train(settings)`` in ``run.out_dir/<sweep>/<trial id>`` with ``run.time_budget_s = budget_s``
   (a budget per trial, so trials are comparable and the sweep's length is trials x budget), then evaluated on the
   validation split (:mod:`paws_cli.eval.validation`: train images outside the labelled subset, never the test
   set). A trial whose loss turns non-finite is recorded as failed and the sweep goes on.
3. The trial with the best validation top-1 (PAWS-NN for learned embeddings, the classifier for method=supervised,
   or ``--metric``) is evaluated once on the test set; no other trial's test accuracy is computed.

Re-running the same command resumes: finished trials (``sweep.jsonl``) are skipped, an interrupted trial continues
from its checkpoint, and the selected trial's test result is reused (:mod:`paws_cli.sweep.state`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from paws_cli.config import Settings, load_settings
from paws_cli.eval.knn_eval import KnnResult, evaluate_checkpoint, knn_table, results_path
from paws_cli.eval.validation import check_labels_hidden
from paws_cli.io_utils import atomic_write_text
from paws_cli.sweep.grid import Axis, Trial, grid_trials, parse_axes
from paws_cli.sweep.sampler import import_optuna, propose
from paws_cli.sweep.state import SweepDir
from paws_cli.sweep.table import METRIC_NAMES, markdown_table, rich_table, table_rows
from paws_cli.train.checkpoint_io import load_checkpoint
from paws_cli.train.guards import NonFiniteLossError, TrainingInterruptedError
from paws_cli.train.loop import train
from paws_cli.train.rundir import CHECKPOINT

__all__ = ["SweepOutcome", "run_sweep"]

METRICS = ("auto", "paws_nn", "knn", "classifier")
#: Proposals in a row that repeat finished trials before a --trials sweep stops early.
MAX_REPEATS = 50


@dataclass
class SweepOutcome:
    path: Path
    records: list[dict[str, Any]]  # the finished trials of this sweep, in the order they finished
    selected: dict[str, Any] | None  # the selected trial's record plus its test result


@dataclass
class _Sweep:
    """What every trial of one sweep shares."""

    recipe: str | None
    axes: list[Axis]
    settings: dict[str, Settings]  # by trial id
    trials: list[Trial]  # the grid, in order
    dir: SweepDir
    metric: str
    console: Console
    overwrite: bool

    def trial_id(self, trial: Trial) -> str:
        return trial.trial_id(self.axes)


def metric_of(settings: Settings, metric: str) -> str:
    """The validation metric of a trial: ``--metric``, or for 'auto' the supervised baseline's classifier and
    PAWS-NN for every learned embedding."""
    if metric == "auto":
        return "classifier" if settings.method == "supervised" else "paws_nn"
    return metric


def _with_budget(axes: list[Axis], budget_s: float | None) -> list[Axis]:
    if budget_s is None:
        return axes
    if budget_s <= 0:
        raise ValueError(f"--budget-s must be positive, got {budget_s}")
    if any(a.key == "run.time_budget_s" for a in axes):
        raise ValueError("give the per-trial budget once: --budget-s or run.time_budget_s=..., not both")
    return [*axes, Axis("run.time_budget_s", (repr(float(budget_s)),))]


def _prepare(
    recipe: str | None,
    axis_args: Sequence[str],
    *,
    name: str | None,
    budget_s: float | None,
    metric: str,
    console: Console,
    overwrite: bool,
) -> _Sweep:
    if metric not in METRICS:
        raise ValueError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not axis_args:
        raise ValueError("give at least one KEY=V1,V2,... to sweep (e.g. optim.lr=0.5,1.0,2.0)")
    axes = _with_budget(parse_axes(axis_args), budget_s)
    trials = grid_trials(axes)
    base = load_settings(recipe, trials[0].overrides)
    default = f"sweep_{Path(recipe).stem if recipe else 'defaults'}"
    sweep_dir = SweepDir(Path(base.run.out_dir) / (name or default))
    settings = {}
    for trial in trials:  # every trial's settings are checked before the first one trains
        tid = trial.trial_id(axes)
        extra = [f"run.out_dir={sweep_dir.path}", f"run.name={tid}"]
        settings[tid] = s = load_settings(recipe, [*trial.overrides, *extra])
        check_labels_hidden(s)
        if s.run.launcher != "local":
            raise ValueError(
                f"paws sweep trains its trials one after another in this process; run.launcher={s.run.launcher} "
                "is not supported (run the sweep itself inside the job, with run.launcher=local)"
            )
        if metric == "classifier" and s.method != "supervised":
            raise ValueError(
                f"--metric classifier scores the supervised baseline's classifier; {tid} is {s.method}"
            )
    spec = {
        "recipe": recipe,
        "keys": sorted(a.key for a in axes if a.varies),
        "budget_s": budget_s,
        "metric": metric,
    }
    for note in sweep_dir.claim(spec, overwrite=overwrite):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    return _Sweep(recipe, axes, settings, trials, sweep_dir, metric, console, overwrite)


def _validation_record(
    sweep: _Sweep, trial: Trial, result: KnnResult | None, error: str | None
) -> dict[str, Any]:
    tid = sweep.trial_id(trial)
    settings = sweep.settings[tid]
    metric = metric_of(settings, sweep.metric)
    value = getattr(result, f"{metric}_top1") if result is not None else None
    return {
        "trial": tid,
        "overrides": trial.overrides,
        "swept": trial.swept(sweep.axes),
        "run_dir": str(sweep.dir.trial_dir(tid)),
        "method": settings.method,
        "metric": metric,
        "val_top1": value,
        "status": "ok" if result is not None else "failed",
        "error": error,
        "val": result.as_dict() if result is not None else None,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _run_trial(sweep: _Sweep, trial: Trial, number: str) -> dict[str, Any]:
    """Train (or continue) one trial, score it on the validation split and record it."""
    tid = sweep.trial_id(trial)
    settings, run_dir = sweep.settings[tid], sweep.dir.trial_dir(tid)
    resume = (run_dir / CHECKPOINT).is_file() and not sweep.overwrite
    swept = " ".join(f"{k}={v}" for k, v in trial.swept(sweep.axes).items()) or "(no swept key)"
    # A printed line, not a rule: a rule cuts its title to one line with an ellipsis, and these are what users copy.
    sweep.console.print(
        f"\n[bold]── trial {number}: {escape(swept)}[/] ({'resumed' if resume else 'new'}, {escape(str(run_dir))})"
    )
    try:
        run = train(settings, resume=resume, overwrite=not resume, console=sweep.console, default_name=tid)
    except NonFiniteLossError as exc:
        sweep.console.print(f"[yellow]trial {tid} failed:[/] {exc}", highlight=False)
        record = _validation_record(sweep, trial, None, f"non-finite loss: {exc}")
        sweep.dir.append_record(record)
        return record
    except TrainingInterruptedError as exc:
        raise TrainingInterruptedError(
            f"{exc}. The sweep continues this trial when the same `paws sweep` command is run again",
            exc.checkpoint,
        ) from None
    result = evaluate_checkpoint(load_checkpoint(run.checkpoint), settings, str(run.checkpoint), on="val")
    atomic_write_text(results_path(run.checkpoint, "val"), json_dump(result.as_dict()))
    record = _validation_record(sweep, trial, result, None)
    if record["val_top1"] is None:
        raise ValueError(f"--metric {sweep.metric}: {tid} ({settings.method}) has no classifier to score")
    record |= {"steps": run.steps, "train_seconds": round(run.train_seconds, 1)}
    sweep.dir.append_record(record)
    sweep.console.print(
        f"trial {tid}: validation {METRIC_NAMES[record['metric']]} top-1 {record['val_top1']:.2f}% "
        f"({result.queries} images)",
        highlight=False,
    )
    return record


def json_dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def _run_grid(sweep: _Sweep, done: dict[str, dict[str, Any]]) -> None:
    for i, trial in enumerate(sweep.trials, start=1):
        tid = sweep.trial_id(trial)
        if tid in done:
            continue
        done[tid] = _run_trial(sweep, trial, f"{i}/{len(sweep.trials)}")


def _run_sampled(sweep: _Sweep, done: dict[str, dict[str, Any]], order: list[str], n: int, seed: int) -> None:
    """``n`` distinct trials proposed by TPE (at most the grid's size), continuing a pending proposal first."""
    import_optuna()  # fail before training anything when optuna is missing
    grid = {sweep.trial_id(t): t for t in sweep.trials}
    target = min(n, len(grid))
    if n > len(grid):
        sweep.console.print(
            f"[yellow]note:[/] --trials {n} exceeds the grid's {len(grid)} trials; running {target}"
        )
    startup = max(1, min(10, target // 2))
    history = [(done[t]["swept"], done[t]["val_top1"]) for t in order]
    repeats = 0
    while len(order) < target:
        pending = sweep.dir.pending()
        if pending is not None and pending["trial"] in grid and pending["trial"] not in done:
            trial = grid[pending["trial"]]
        else:
            trial = propose(sweep.axes, history, seed=seed, startup=startup)
        tid = sweep.trial_id(trial)
        if tid in done:  # TPE proposed a finished trial: count it again so the next proposal differs
            history.append((done[tid]["swept"], done[tid]["val_top1"]))
            repeats += 1
            if repeats >= MAX_REPEATS:
                sweep.console.print("[yellow]note:[/] the sampler keeps proposing finished trials; stopping")
                return
            continue
        repeats = 0
        sweep.dir.set_pending({"trial": tid, "overrides": trial.overrides})
        done[tid] = record = _run_trial(sweep, trial, f"{len(order) + 1}/{target}")
        order.append(tid)
        history.append((record["swept"], record["val_top1"]))


def _select_and_test(sweep: _Sweep, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best trial by validation top-1 and its test result (computed once, then read from selected.json)."""
    scored = [r for r in records if r["val_top1"] is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: r["val_top1"])  # max keeps the first of equal ones
    previous = sweep.dir.selected()
    if (
        previous is not None
        and previous["trial"] == best["trial"]
        and previous["val_top1"] == best["val_top1"]
    ):
        return previous
    settings = sweep.settings[best["trial"]]
    checkpoint = sweep.dir.trial_dir(best["trial"]) / CHECKPOINT
    sweep.console.print(
        f"\n[bold]── selected {escape(best['trial'])}: its test accuracy (the only test evaluation)"
    )
    test = evaluate_checkpoint(load_checkpoint(checkpoint), settings, str(checkpoint), on="test")
    atomic_write_text(results_path(checkpoint, "test"), json_dump(test.as_dict()))
    sweep.console.print(knn_table(test))
    selected = {**best, "test_top1": getattr(test, f"{best['metric']}_top1"), "test": test.as_dict()}
    sweep.dir.set_selected(selected)
    return selected


def run_sweep(
    recipe: str | None,
    axis_args: Sequence[str],
    *,
    console: Console,
    name: str | None = None,
    budget_s: float | None = None,
    trials: int | None = None,
    metric: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
) -> SweepOutcome:
    """Run (or resume) a sweep; see the module doc. Returns its records and the selected trial."""
    if trials is not None and trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    sweep = _prepare(
        recipe, axis_args, name=name, budget_s=budget_s, metric=metric, console=console, overwrite=overwrite
    )
    grid_ids = {sweep.trial_id(t) for t in sweep.trials}
    # Only this grid's records count: a trial of an earlier command with other values is not compared.
    finished = [r for r in sweep.dir.records() if r["trial"] in grid_ids]
    done = {r["trial"]: r for r in finished}
    if finished:
        console.print(f"resuming {sweep.dir.path}: {len(done)} finished trial(s) kept", highlight=False)
    if trials is None:
        _run_grid(sweep, done)
    else:
        _run_sampled(sweep, done, [r["trial"] for r in finished], trials, seed)
    records = [r for r in sweep.dir.records() if r["trial"] in grid_ids]
    selected = _select_and_test(sweep, records)
    _report(sweep, records, selected)
    return SweepOutcome(sweep.dir.path, records, selected)


def _report(sweep: _Sweep, records: list[dict[str, Any]], selected: dict[str, Any] | None) -> None:
    keys = [a.key for a in sweep.axes if a.varies]
    header, rows = table_rows(records, keys, selected)
    val = next((r["val"] for r in records if r["val"] is not None), None)
    where = val["queries_from"] if val else "the validation split"
    title = f"sweep {sweep.dir.path.name}: {len(records)} trial(s), selected on {where}"
    sweep.console.print(rich_table(header, rows, title))
    budget = next(iter(sweep.settings.values())).run.time_budget_s
    lines = [
        f"# Sweep {sweep.dir.path.name}",
        "",
        f"Recipe `{sweep.recipe}`; per-trial wall-clock budget: {f'{budget:g} s' if budget else 'none'}.",
        f"Selection: validation top-1 on {where}; the test set was evaluated for the selected trial only.",
        "",
        markdown_table(header, rows),
    ]
    path = sweep.dir.write_table("\n".join(lines))
    sweep.console.print(f"table: {path}; records: {sweep.dir.path / 'sweep.jsonl'}", highlight=False)
    if selected is None:
        raise ValueError(f"every trial of {sweep.dir.path} failed; no trial can be selected (see the table)")
    sweep.console.print(
        f"selected {selected['trial']}: validation {selected['val_top1']:.2f}%, test {selected['test_top1']:.2f}% "
        f"({METRIC_NAMES[selected['metric']]} top-1)",
        highlight=False,
    )
