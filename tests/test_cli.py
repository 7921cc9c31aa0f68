"""The command line end to end: a tiny pretrain + knn-eval in seconds, and clear errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from paws_cli.cli import app

pytestmark = pytest.mark.slow  # end-to-end training runs (seconds each); make test runs them

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def test_pretrain_then_knn_eval(tiny_overrides: list[str], tmp_path: Path) -> None:
    code, out = _run("pretrain", "--recipe", "fmnist_demo", *tiny_overrides, "optim.epochs=4", "optim.lr=0.5")
    assert code == 0, out
    assert "global unlabelled batch: 16" in out and "global support: 4 classes x 2 images" in out
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoint.pt"
    assert checkpoint.is_file()
    code, out = _run("knn-eval", str(checkpoint), "eval.knn_k=5")
    assert code == 0, out
    assert "PAWS-NN" in out and "4 per class, seed 0 (16 labelled images)" in out
    results = json.loads((checkpoint.parent / "knn_eval.json").read_text())
    assert results["bank_size"] == 16 and results["queries"] == 64 and results["knn_k"] == 5
    assert results["embedding"] == "projection"  # the demo recipe has no prediction head
    assert 25.0 < results["paws_nn_top1"] <= 100.0
    # a second pretrain into the same run directory refuses, naming the way out
    code, out = _run("pretrain", "--recipe", "fmnist_demo", *tiny_overrides)
    assert code == 2 and "--resume" in out


def test_supervised_baseline_reports_its_classifier(tiny_overrides: list[str], tmp_path: Path) -> None:
    code, out = _run(
        "pretrain", "--recipe", "fmnist_demo", *tiny_overrides, "method=supervised", "optim.epochs=1"
    )
    assert code == 0, out
    code, out = _run("knn-eval", str(tmp_path / "runs" / "tiny" / "checkpoint.pt"))
    assert code == 0 and "linear classifier" in out


def test_print_config_and_errors_exit_2() -> None:
    code, out = _run("pretrain", "--recipe", "fmnist_demo", "optim.lr=0.3", "--print-config")
    assert code == 0 and "lr: 0.3" in out
    code, out = _run("pretrain", "--recipe", "fmnist_demo", "optim.lrr=0.3")
    assert code == 2 and "Did you mean 'optim.lr'" in out
    code, out = _run("knn-eval", "/nonexistent/checkpoint.pt")
    assert code == 2 and "does not exist" in out
    code, out = _run("finetune", "x.pt")
    assert code == 2 and "x.pt" in out and "does not exist" in out


def test_recipes_and_settings_listing() -> None:
    code, out = _run("recipes", "ls")
    assert code == 0 and "fmnist_demo" in out
    code, out = _run("recipes", "show", "fmnist_demo")
    assert code == 0 and "backbone: cnn_w16" in out
    code, out = _run("settings", "--recipe", "fmnist_demo")
    assert code == 0 and "optim.lr" in out and "Peak learning rate" in out


def test_make_splits_on_a_converted_dataset(tiny_dataset: Path, tmp_path: Path) -> None:
    code, out = _run(
        "make-splits", str(tiny_dataset), str(tmp_path / "splits"), "--per-class", "3", "--val-per-class", "2"
    )
    assert code == 0, out
    lines = [
        x for x in (tmp_path / "splits" / "labelled.txt").read_text().splitlines() if not x.startswith("#")
    ]
    assert len(lines) == 12
    code, out = _run("make-splits", str(tiny_dataset), str(tmp_path / "s2"))
    assert code == 2 and "exactly one of" in out


def test_module_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "paws_cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "pretrain" in out.stdout and "knn-eval" in out.stdout
