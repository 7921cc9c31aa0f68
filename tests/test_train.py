"""The training loop: it learns, its checkpoints round-trip, and resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from paws_cli.config import load_settings
from paws_cli.config.paths import with_absolute_paths
from paws_cli.eval.knn_eval import evaluate_checkpoint
from paws_cli.train.checkpoint_io import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from paws_cli.train.loop import train
from paws_cli.train.rundir import RunDirError

pytestmark = pytest.mark.slow  # end-to-end training runs (seconds each); make test runs them

QUIET = Console(quiet=True)


def _train(overrides: list[str], **kwargs: object):
    return train(load_settings("fmnist_demo", overrides, environ={}), console=QUIET, **kwargs)


def test_two_epochs_straight_equal_one_plus_resume_plus_one(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    straight = _train([*tiny_overrides, "run.name=straight"])
    first = _train([*tiny_overrides, "run.name=resumed", "run.max_steps=16"])
    assert first.steps == 16
    resumed = _train([*tiny_overrides, "run.name=resumed"], resume=True)
    assert straight.steps == resumed.steps == 32
    a = load_checkpoint(straight.checkpoint)
    b = load_checkpoint(resumed.checkpoint)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key in ("step", "epoch"):
        assert a[key] == b[key]
    assert a["data"] == b["data"]


def test_resume_mid_epoch_is_exact(tiny_overrides: list[str]) -> None:
    straight = _train([*tiny_overrides, "run.name=straight", "optim.epochs=1"])
    _train([*tiny_overrides, "run.name=mid", "optim.epochs=1", "run.max_steps=5"])
    resumed = _train([*tiny_overrides, "run.name=mid", "optim.epochs=1"], resume=True)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_checkpoint_is_plain_data_and_records_run(tiny_overrides: list[str]) -> None:
    result = _train([*tiny_overrides, "optim.epochs=1"])
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert state["format"] == "paws-checkpoint" and state["step"] == 16
    assert state["settings"]["optim"]["batch_size"] == 16
    assert set(state["data"]) == {"unlabelled", "supports"}
    assert len(state["labelled"]) == 16  # 4 labels x 4 classes
    run_dir = result.run_dir
    assert (run_dir / "resolved_config.yaml").is_file() and (run_dir / "labelled.txt").is_file()
    epochs = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    assert {"target_confidence", "support_accuracy", "ce", "me_max_kl"} <= set(epochs[0])
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [4, 8, 12, 16]
    # the resolved config re-runs as a recipe and gives the same settings (its paths recorded absolute)
    again = load_settings(str(run_dir / "resolved_config.yaml"), environ={})
    given = load_settings("fmnist_demo", [*tiny_overrides, "optim.epochs=1"], environ={})
    assert again == with_absolute_paths(given)


def test_paws_learns_on_tiny_data(tiny_overrides: list[str]) -> None:
    """PAWS-NN on the held-out tiny test set beats chance (25%) clearly after a few seconds of training."""
    settings = load_settings("fmnist_demo", [*tiny_overrides, "optim.epochs=8", "optim.lr=0.5"], environ={})
    result = train(settings, console=QUIET)
    state = load_checkpoint(result.checkpoint)
    evaluation = evaluate_checkpoint(state, settings, str(result.checkpoint))
    assert evaluation.paws_nn_top1 > 60.0
    epochs = [json.loads(line) for line in (result.run_dir / "epochs.jsonl").read_text().splitlines()]
    assert epochs[-1]["target_confidence"] > 0.6  # well above uniform (1/4): no collapse
    assert epochs[-1]["support_accuracy"] > 0.5


def test_run_dir_policy(tiny_overrides: list[str]) -> None:
    _train([*tiny_overrides, "run.max_steps=2"])
    with pytest.raises(RunDirError, match="--resume"):
        _train([*tiny_overrides, "run.max_steps=2"])
    _train([*tiny_overrides, "run.max_steps=2"], overwrite=True)


def test_resume_refuses_changed_settings(tiny_overrides: list[str]) -> None:
    _train([*tiny_overrides, "run.max_steps=2"])
    with pytest.raises(CheckpointError, match=r"optim\.lr"):
        _train([*tiny_overrides, "optim.lr=0.7"], resume=True)


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "other.pt", {"model": {"w": torch.zeros(3)}})
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"missing.*bias|unexpected: w"):
        load_state_strict(model, load_checkpoint(tmp_path / "other.pt")["model"], "other.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch: weight"):
        load_state_strict(model, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}, "x")


def test_failed_checkpoint_write_keeps_previous(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})

    class Unsaveable:
        pass

    with pytest.raises(Exception):  # noqa: B017  (torch raises different types per version)
        save_checkpoint(path, {"step": 2, "bad": Unsaveable()})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
