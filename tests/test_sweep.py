"""`paws sweep`: axes and trial ids, and tiny sweeps end to end (select on validation, test once, resume)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config import ConfigError, load_settings
from paws_cli.data.backends.eval_data import MemoryEvalData
from paws_cli.sweep.grid import Axis, grid_trials, parse_axes, split_values
from paws_cli.sweep.sampler import propose
from paws_cli.sweep.state import SweepDir
from paws_cli.sweep.table import sorted_records
from paws_cli.train.loop import train

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def test_values_split_outside_brackets_and_quotes() -> None:
    assert split_values("0.5,1,2.0") == ["0.5", "1", "2.0"]
    assert split_values("[0.3,1.0],[0.5, 1.0]") == ["[0.3,1.0]", "[0.5, 1.0]"]
    assert split_values("'a,b',{x: 1, y: 2},null") == ["'a,b'", "{x: 1, y: 2}", "null"]
    for bad in ("[0.3,1.0", "0.3]", "'a,b"):
        with pytest.raises(ValueError, match="sweep values"):
            split_values(bad)


def test_axes_are_checked() -> None:
    axes = parse_axes(["augment.large_scale=[0.3,1.0],[0.5,1.0]", "optim.lr=0.5", "paws.tau=0.1,0.2"])
    assert axes[0] == Axis("augment.large_scale", ("[0.3,1.0]", "[0.5,1.0]")) and not axes[1].varies
    trials = grid_trials(axes)
    assert [t.overrides for t in trials][:2] == [
        ["augment.large_scale=[0.3,1.0]", "optim.lr=0.5", "paws.tau=0.1"],
        ["augment.large_scale=[0.3,1.0]", "optim.lr=0.5", "paws.tau=0.2"],
    ]
    settings = load_settings("fmnist_demo", trials[3].overrides)  # values read like overrides
    assert settings.augment.large_scale == (0.5, 1.0) and settings.paws.tau == 0.2
    cases = {
        "optim.lrr=1,2": "unknown setting 'optim.lrr'",
        "optim.lr": "not KEY=V1,V2",
        "optim.lr=1,,2": "empty value",
        "optim.lr=1,1.0": "lists a value twice",
        "run.name=a,b": "cannot be swept",
        "eval.val_images=100,200": "one value in a sweep",
    }
    for arg, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            parse_axes([arg])
    with pytest.raises(ConfigError, match="given twice"):
        parse_axes(["optim.lr=1", "optim.lr=2"])


def test_trial_ids_are_stable_and_tell_trials_apart() -> None:
    axes = parse_axes(["optim.lr=0.5,1.0", "augment.large_scale=[0.3,1.0]"])
    ids = [t.trial_id(axes) for t in grid_trials(axes)]
    assert ids[0].startswith("lr=0.5-") and ids[1].startswith("lr=1.0-") and len(set(ids)) == 2
    same = parse_axes(["optim.lr=0.50,1.0", "augment.large_scale=[0.3, 1.0]"])  # equal once parsed
    assert [t.trial_id(same) for t in grid_trials(same)] == ids
    other = parse_axes(["optim.lr=0.5,1.0", "augment.large_scale=[0.4,1.0]"])  # a fixed value differs
    assert not set(t.trial_id(other) for t in grid_trials(other)) & set(ids)


def test_ranking_puts_failed_trials_last() -> None:
    records = [
        {"trial": "a", "val_top1": None},
        {"trial": "b", "val_top1": 50.0},
        {"trial": "c", "val_top1": 70.0},
    ]
    records.append({"trial": "d", "val_top1": 70.0})
    assert [r["trial"] for r in sorted_records(records)] == ["c", "d", "b", "a"]


@pytest.fixture()
def fixed(tiny_overrides: list[str]) -> list[str]:
    """The tiny run's overrides as single-valued sweep axes: 8 steps, 80 validation images (20 per class)."""
    kept = [o for o in tiny_overrides if not o.startswith("run.name=")]
    return [*kept, "run.max_steps=8", "run.num_threads=1", "eval.val_images=80", "eval.knn_k=5"]


@pytest.fixture()
def test_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the evaluations that read the test split (MemoryEvalData.query_batches)."""
    calls: list[int] = []
    original = MemoryEvalData.query_batches

    def counted(self: MemoryEvalData, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MemoryEvalData, "query_batches", counted)
    yield calls


@pytest.mark.slow
def test_grid_selects_on_validation_tests_once_and_resumes(
    fixed: list[str], tmp_path: Path, test_reads: list[int]
) -> None:
    args = ["sweep", "--recipe", "fmnist_demo", "--name", "s", "optim.lr=0.5,2.0", *fixed]
    code, out = _run(*args)
    assert code == 0, out
    sweep = SweepDir(tmp_path / "runs" / "s")
    records = sweep.records()
    assert [r["swept"] for r in records] == [{"optim.lr": "0.5"}, {"optim.lr": "2.0"}]
    for rec in records:
        assert rec["status"] == "ok" and rec["steps"] == 8 and rec["metric"] == "paws_nn"
        assert rec["val"]["on"] == "val" and rec["val"]["queries"] == 80 and rec["val"]["bank_size"] == 16
        assert rec["val_top1"] == rec["val"]["paws_nn_top1"]
        assert (Path(rec["run_dir"]) / "knn_eval_val.json").is_file()
    best = max(records, key=lambda r: r["val_top1"])
    selected = sweep.selected()
    assert selected is not None and selected["trial"] == best["trial"]
    # the test split was read once, for the selected trial; no other trial has a test result
    assert len(test_reads) == 1
    tested = [r["trial"] for r in records if (Path(r["run_dir"]) / "knn_eval.json").is_file()]
    assert tested == [best["trial"]]
    assert selected["test"]["queries"] == 64 and selected["test_top1"] == selected["test"]["paws_nn_top1"]
    table = (sweep.path / "sweep.md").read_text()
    assert "test set was evaluated for the selected trial only" in table and table.count(" - |") == 1
    assert f"{selected['test_top1']:.2f}" in out and "validation split (80 train images" in out

    # The same command again changes nothing and reads no test image.
    code, out = _run(*args)
    assert code == 0 and len(test_reads) == 1 and len(sweep.records()) == 2, out

    # A different sweep in the same directory is refused.
    code, out = _run("sweep", "--recipe", "fmnist_demo", "--name", "s", "paws.tau=0.1,0.2", *fixed)
    assert code == 2 and "holds another sweep" in out and "--overwrite" in out

    # Interrupted: the second trial's record is lost and its run stopped after 4 of its 8 steps.
    lines = (sweep.path / "sweep.jsonl").read_text().splitlines(keepends=True)
    (sweep.path / "sweep.jsonl").write_text(lines[0])
    second = Path(records[1]["run_dir"])
    first_checkpoint = Path(records[0]["run_dir"]) / "checkpoint.pt"
    first_mtime = first_checkpoint.stat().st_mtime_ns
    partial = [*records[1]["overrides"], f"run.out_dir={sweep.path}", f"run.name={second.name}"]
    train(load_settings("fmnist_demo", [*partial, "run.max_steps=4"]), overwrite=True)
    code, out = _run(*args)
    assert code == 0, out
    assert "resuming" in out and "step 4 of 8" in out
    resumed = sweep.records()
    assert [r["trial"] for r in resumed] == [r["trial"] for r in records] and resumed[1]["steps"] == 8
    assert first_checkpoint.stat().st_mtime_ns == first_mtime  # the finished trial was not trained again
    # knn-eval --on val of a trial's checkpoint gives the number the sweep recorded
    code, out = _run("knn-eval", str(second / "checkpoint.pt"), "--on", "val")
    assert code == 0, out
    assert json.loads((second / "knn_eval_val.json").read_text())["paws_nn_top1"] == resumed[1]["val_top1"]


@pytest.mark.slow
def test_supervised_selects_on_its_classifier_and_sampler_path(
    fixed: list[str], tmp_path: Path, test_reads: list[int]
) -> None:
    code, out = _run(
        "sweep",
        "--recipe",
        "fmnist_demo",
        "--name",
        "sup",
        "--trials",
        "2",
        "--budget-s",
        "30",
        "method=supervised",
        "optim.lr=0.1,0.5,1.0",
        *fixed,
    )
    assert code == 0, out
    sweep = SweepDir(tmp_path / "runs" / "sup")
    records = sweep.records()
    assert len(records) == 2 and len({r["trial"] for r in records}) == 2
    assert all(r["metric"] == "classifier" and r["val_top1"] == r["val"]["classifier_top1"] for r in records)
    assert all("run.time_budget_s=30.0" in r["overrides"] for r in records)
    assert len(test_reads) == 1 and sweep.pending() is None
    selected = sweep.selected()
    assert selected is not None and selected["test_top1"] == selected["test"]["classifier_top1"]
    # one more trial: the two finished ones are kept, the sampler proposes a third
    code, out = _run(
        "sweep", "--recipe", "fmnist_demo", "--name", "sup", "--trials", "3", "--budget-s", "30",
        "method=supervised", "optim.lr=0.1,0.5,1.0", *fixed,
    )  # fmt: skip
    assert code == 0, out
    again = sweep.records()
    assert again[:2] == records and {r["swept"]["optim.lr"] for r in again} == {"0.1", "0.5", "1.0"}


def test_proposals_are_a_function_of_the_finished_trials() -> None:
    axes = parse_axes(["optim.lr=0.1,0.2,0.4,0.8", "paws.tau=0.1,0.2"])
    history = [({"optim.lr": "0.2", "paws.tau": "0.1"}, 60.0), ({"optim.lr": "0.8", "paws.tau": "0.2"}, None)]
    first = propose(axes, history, seed=3, startup=1)
    assert propose(axes, history, seed=3, startup=1) == first  # a resumed sweep proposes the same trial
    assert first in grid_trials(axes)


def test_missing_optuna_is_named(monkeypatch: pytest.MonkeyPatch, fixed: list[str], tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    code, out = _run(
        "sweep", "--recipe", "fmnist_demo", "--name", "o", "--trials", "2", "optim.lr=1,2", *fixed
    )
    assert code == 2 and "pip install 'paws-cli[sweep]'" in out
    assert not list((tmp_path / "runs" / "o").glob("*/checkpoint.pt"))  # nothing trained


@pytest.mark.slow
def test_a_diverged_trial_is_recorded_and_overwrite_starts_again(
    fixed: list[str], tmp_path: Path, test_reads: list[int]
) -> None:
    args = [
        "sweep",
        "--recipe",
        "fmnist_demo",
        "--name",
        "d",
        "optim.start_lr=0.1,1e30",  # the tiny runs warm up from start_lr for 8 steps
    ]
    code, out = _run(*args, *fixed)
    assert code == 0, out
    sweep = SweepDir(tmp_path / "runs" / "d")
    ok, failed = sweep.records()
    assert ok["status"] == "ok" and failed["status"] == "failed" and failed["val_top1"] is None
    assert "non-finite loss" in failed["error"]
    selected = sweep.selected()
    assert selected is not None and selected["trial"] == ok["trial"] and len(test_reads) == 1
    assert "failed: non-finite loss" in (sweep.path / "sweep.md").read_text()
    # --overwrite deletes the records and the trial runs, then runs every trial again
    # Another fixed value makes other trials; only they are compared (the earlier records stay in sweep.jsonl)
    code, out = _run(*args, "optim.weight_decay=0", *fixed)
    assert code == 0 and len(sweep.records()) == 4 and len(test_reads) == 2, out
    assert ok["trial"] not in (sweep.path / "sweep.md").read_text()
    # --overwrite deletes the records and the trial runs, then runs every trial again
    code, out = _run(*args, "optim.weight_decay=0", *fixed, "--overwrite")
    assert code == 0 and "--overwrite: removed" in out, out
    assert not Path(ok["run_dir"]).exists() and not Path(failed["run_dir"]).exists()
    again = sweep.records()
    assert len(again) == 2 and all("optim.weight_decay=0" in r["overrides"] for r in again)
    assert (Path(again[0]["run_dir"]) / "checkpoint.pt").is_file() and len(test_reads) == 3


def test_settings_a_sweep_cannot_honour_are_refused_before_training(fixed: list[str], tmp_path: Path) -> None:
    cases = {
        ("run.launcher=slurm",): "run.launcher=slurm is not supported",
        ("--metric", "classifier"): "--metric classifier scores the supervised baseline",
        ("--metric", "top5"): "--metric must be one of",
        ("--budget-s", "10", "run.time_budget_s=5"): "--budget-s or run.time_budget_s",
        ("method=semppl", "semppl.pseudo_labels=oracle"): "pseudo_labels=oracle",
    }
    for extra, message in cases.items():
        code, out = _run("sweep", "--recipe", "fmnist_demo", "--name", "r", "optim.lr=1,2", *fixed, *extra)
        assert code == 2 and message in out, (extra, out)
    assert not (tmp_path / "runs" / "r").exists()
    code, out = _run("knn-eval", str(tmp_path / "x.pt"), "--on", "train")
    assert code == 2 and "--on must be test or val" in out
