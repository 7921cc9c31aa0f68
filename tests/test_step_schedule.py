"""Schedules in steps for short datasets (issue 13, point 5): ``optim.total_steps`` / ``optim.warmup_steps`` as
alternatives to epochs, and a warm-up longer than training is an error naming the setting that caused it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from paws_cli.config import ConfigError, load_settings, settings_to_yaml
from paws_cli.config.schema import OptimSettings
from paws_cli.optim import StepSchedule, schedule_lengths
from paws_cli.train.checkpoint_io import load_checkpoint
from paws_cli.train.loop import train

NO_ENV: dict[str, str] = {}


def test_steps_replace_the_recipes_epochs_layer_by_layer() -> None:
    s = load_settings("fmnist_demo", ["optim.total_steps=300", "optim.warmup_steps=30"], environ=NO_ENV)
    assert (s.optim.epochs, s.optim.total_steps, s.optim.warmup_epochs, s.optim.warmup_steps) == (
        None,
        300,
        None,
        30,
    )
    assert s.optim.length_text() == "300 steps" and s.optim.warmup_text() == "30 warm-up steps"
    # the environment gives steps, an override gives epochs: the override (the higher layer) decides
    s = load_settings("fmnist_demo", ["optim.epochs=3"], environ={"PAWS_OPTIM__TOTAL_STEPS": "50"})
    assert (s.optim.epochs, s.optim.total_steps) == (3, None)
    with pytest.raises(
        ConfigError, match=r"optim.epochs=3 and optim.total_steps=50 are both given by the key=value"
    ):
        load_settings("fmnist_demo", ["optim.epochs=3", "optim.total_steps=50"], environ=NO_ENV)


def test_a_resolved_config_with_steps_re_runs_as_it_is(tmp_path: Path) -> None:
    s = load_settings("fmnist_demo", ["optim.total_steps=40", "optim.warmup_steps=4"], environ=NO_ENV)
    path = tmp_path / "resolved_config.yaml"
    path.write_text(settings_to_yaml(s))
    assert yaml.safe_load(path.read_text())["optim"]["epochs"] is None
    again = load_settings(str(path), [], environ=NO_ENV)
    assert again.optim == s.optim
    back = load_settings(str(path), ["optim.epochs=2", "optim.warmup_epochs=0.5"], environ=NO_ENV)
    assert (back.optim.epochs, back.optim.total_steps, back.optim.warmup_steps) == (2, None, None)


def test_a_warm_up_as_long_as_training_names_the_override() -> None:
    with pytest.raises(ConfigError) as err:
        # the recipe warms up for 0.2 epochs
        load_settings("fmnist_demo", ["optim.epochs=0.2"], environ=NO_ENV)
    message = str(err.value)
    assert "the warm-up (optim.warmup_epochs=0.2) is not shorter than training (optim.epochs=0.2)" in message
    assert "[from override 'optim.epochs=0.2'; recipe 'fmnist_demo']" in message
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=40.*override 'optim.warmup_steps=40'"):
        load_settings("fmnist_demo", ["optim.total_steps=40", "optim.warmup_steps=40"], environ=NO_ENV)


def test_schedule_lengths_in_epochs_steps_and_mixed() -> None:
    assert schedule_lengths(OptimSettings(epochs=2.5, warmup_epochs=0.2), 78) == (195, 16)
    assert schedule_lengths(OptimSettings(total_steps=300, warmup_steps=20), 78) == (300, 20)
    assert schedule_lengths(OptimSettings(total_steps=300, warmup_epochs=1), 78) == (300, 78)
    # mixed units are checked once the steps per epoch are known: the message names both settings
    with pytest.raises(ValueError) as err:
        schedule_lengths(OptimSettings(total_steps=50, warmup_epochs=1), 78)
    message = str(err.value)
    assert "optim.warmup_epochs=1, 78 steps of 78 per epoch" in message and "optim.total_steps=50" in message
    assert "lower optim.warmup_epochs" in message
    with pytest.raises(
        ValueError, match=r"optim.warmup_steps=100\) is not shorter .*optim.epochs=1, 78 steps"
    ):
        schedule_lengths(OptimSettings(epochs=1, warmup_steps=100), 78)


def test_warmup_in_steps_reaches_the_peak_then_the_final_rate() -> None:
    cfg = OptimSettings(optimizer="sgd", total_steps=21, warmup_steps=5, start_lr=0.1, lr=1.1, final_lr=0.01)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = StepSchedule(optimizer, cfg, 21, steps_per_epoch=1000)  # steps per epoch play no part
    lrs = [schedule.set(step) for step in range(21)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[1] == pytest.approx(0.3)  # linear: 0.1 + (1.1 - 0.1) * 1 / 5
    assert lrs[5] == pytest.approx(1.1)
    assert lrs[20] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False))


@pytest.mark.slow
def test_a_run_in_steps_trains_that_many_and_resumes_exactly(tiny_overrides: list[str]) -> None:
    base = [o for o in tiny_overrides if not o.startswith(("optim.epochs=", "optim.warmup_epochs="))]
    base += ["optim.total_steps=7", "optim.warmup_steps=2"]  # 16 steps per epoch: the run ends mid-epoch
    out = io.StringIO()
    straight = train(
        load_settings("fmnist_demo", [*base, "run.name=steps"], environ=NO_ENV), console=Console(file=out)
    )
    assert straight.steps == 7
    assert "steps: 7 (optim.total_steps; 0.438 epochs of 16 steps)" in out.getvalue()
    assert "over 2 warm-up steps" in out.getvalue()
    quiet = Console(quiet=True)
    train(
        load_settings("fmnist_demo", [*base, "run.name=cut", "run.max_steps=3"], environ=NO_ENV),
        console=quiet,
    )
    resumed = train(
        load_settings("fmnist_demo", [*base, "run.name=cut"], environ=NO_ENV), console=quiet, resume=True
    )
    assert resumed.steps == 7
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
