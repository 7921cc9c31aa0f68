"""SemPPL as a method of the toolkit: it trains on the in-memory back end, logs its health signals, resumes
exactly with its queues and target network, honours its EMA and oracle settings, and every evaluation command
reads its checkpoints as it reads PAWS's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config import load_settings
from paws_cli.data.needs import needs_of
from paws_cli.methods import create_method
from paws_cli.train.checkpoint_io import load_checkpoint
from paws_cli.train.loop import train

pytestmark = pytest.mark.slow  # end-to-end training runs (seconds each); make test runs them

QUIET = Console(quiet=True)
HEALTH = ("pseudo_label_accuracy", "valid_positives", "queue_classes", "vote_agreement", "augm", "sempos")


@pytest.fixture()
def semppl(tiny_overrides: list[str]) -> list[str]:
    """The SemPPL demo recipe on the tiny dataset: 4 large 16 px + 2 small views, a 4-class labelled sub-batch."""
    return [
        *tiny_overrides,
        "method=semppl",
        "model.pred_hidden_dim=32",
        "semppl.queue_size=64",
        "semppl.labelled_batch.classes_per_batch=4",
        "semppl.num_negatives=6",
    ]


def _train(overrides: list[str], **kwargs: object):
    return train(load_settings("semppl_fmnist_demo", overrides, environ={}), console=QUIET, **kwargs)


def _records(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_views_and_data_needs(semppl: list[str]) -> None:
    settings = load_settings("semppl_fmnist_demo", [*semppl, "semppl.byol_presets=true"], environ={})
    needs = needs_of(settings)
    assert needs.labels_in_batch and needs.support is None
    assert [v.size for v in needs.views] == [16] * 4 + [8] * 2
    # BYOL's asymmetric presets (spec 4): two large views of each kind, small views like the second kind
    assert [(v.blur_p, v.solarize_p) for v in needs.views] == [(1.0, 0.0)] * 2 + [(0.1, 0.2)] * 4
    plain = needs_of(load_settings("semppl_fmnist_demo", [*semppl, "semppl.byol_presets=false"], environ={}))
    assert {(v.blur_p, v.solarize_p) for v in plain.views} == {(0.0, 0.0)}


def test_trains_logs_health_and_resumes_exactly(semppl: list[str]) -> None:
    straight = _train([*semppl, "run.name=straight"])
    _train([*semppl, "run.name=cut", "run.max_steps=10"])
    resumed = _train([*semppl, "run.name=cut"], resume=True)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["step"] == b["step"] == 32
    assert any(k.startswith("target.") for k in a["model"])  # the EMA target is part of the checkpoint
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["method_state"]["queue"].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["method_state"]["queue"][key])), key
    assert int(a["method_state"]["calls"]) == 32
    labels = a["method_state"]["queue"]["labels"]
    assert bool((labels >= 0).all())  # 32 steps x 5 labelled images fill the 64 slots of every queue
    record = _records(straight.run_dir)[-1]
    assert set(HEALTH) <= set(record)
    assert 0.0 <= record["pseudo_label_accuracy"] <= 1.0 and record["queue_classes"] == 4.0


def test_oracle_labels_give_every_anchor_a_positive(semppl: list[str]) -> None:
    """With true labels everywhere, all positives are valid once every class has two images in the queues.

    The labelled sub-batch brings one image of each class per step and cycles through a class's images without
    repeating, so after two steps every class has two distinct images queued: an anchor may not take itself
    (its own id is excluded), but it always finds the other."""
    result = _train(
        [*semppl, "run.name=oracle", "semppl.pseudo_labels=oracle", "optim.epochs=1", "run.log_every=1"]
    )
    valid = [r["valid_positives"] for r in _records(result.run_dir)]
    assert valid[0] == 0.0  # the queues start empty
    assert valid[2:] == [1.0] * (len(valid) - 2)
    knn = _train([*semppl, "run.name=knn", "optim.epochs=1", "run.log_every=1"])
    assert _records(knn.run_dir)[0]["valid_positives"] == 0.0


def test_ema_base_one_keeps_the_target_at_its_initial_weights(semppl: list[str]) -> None:
    frozen = _train([*semppl, "run.name=frozen", "semppl.ema_base=1.0", "optim.epochs=1"])
    moving = _train([*semppl, "run.name=moving", "optim.epochs=1"])
    settings = load_settings("semppl_fmnist_demo", semppl, environ={})
    torch.manual_seed(settings.run.seed)  # the loop seeds before building the model
    initial = create_method(settings, in_chans=1, num_classes=4).build_model().state_dict()
    target_keys = [k for k in initial if k.startswith("target.") and initial[k].is_floating_point()]
    frozen_state = load_checkpoint(frozen.checkpoint)["model"]
    moving_state = load_checkpoint(moving.checkpoint)["model"]
    params = [k for k in target_keys if "running_" not in k]  # BN statistics are copied from the online net
    assert all(torch.equal(frozen_state[k], initial[k]) for k in params)
    assert not all(torch.equal(moving_state[k], initial[k]) for k in params)
    for key in params:  # the target never receives gradients: only EMA moves it, towards the online weights
        online = moving_state[key.replace("target.", "encoder.", 1)]
        assert (moving_state[key] - online).abs().max() <= (initial[key] - online).abs().max() + 1e-6


def test_evaluation_commands_accept_semppl_checkpoints(semppl: list[str], tmp_path: Path) -> None:
    result = _train([*semppl, "run.name=evalme", "optim.epochs=1"])
    runner = CliRunner()
    checkpoint = str(result.checkpoint)
    for args in (
        ["knn-eval", checkpoint],
        ["finetune", checkpoint, "finetune.epochs=1", "run.name=semppl_ft"],
        ["export", checkpoint, str(tmp_path / "semppl.safetensors")],
    ):
        outcome = runner.invoke(app, args)
        assert outcome.exit_code == 0, (args, outcome.output, outcome.exception)
    knn = json.loads((result.run_dir / "knn_eval.json").read_text())
    assert knn["method"] == "semppl" and knn["paws_nn_top1"] > 25.0  # 4 classes: chance is 25%
    assert (tmp_path / "semppl.safetensors").stat().st_size > 0
