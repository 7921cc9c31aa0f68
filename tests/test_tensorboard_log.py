"""run.tensorboard=true: TensorBoard's own reader returns the values of metrics.jsonl and epochs.jsonl at the same
steps (pretraining and fine-tuning), a resumed run shows each step once, and a missing extra is a clear error."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from paws_cli.config import load_settings
from paws_cli.finetune.train import run_finetune
from paws_cli.pretrained import load_pretrained, resolve_settings
from paws_cli.train.loop import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

QUIET = Console(quiet=True)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run directory's event files, as TensorBoard reads them."""
    reader = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def _expected(run_dir: Path, log: str, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """What the JSONL log says TensorBoard must hold: every numeric key but step, at the record's step."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / log).read_text().splitlines():
        record: dict[str, Any] = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(f"{prefix}/{key}", []).append((record["step"], float(value)))
    return out


def _assert_same(
    found: dict[str, list[tuple[int, float]]], expected: dict[str, list[tuple[int, float]]]
) -> None:
    assert set(found) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in found[tag]] == [s for s, _ in points], tag
        # event files hold float32
        assert [v for _, v in found[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-9), tag


def _logged(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    return _expected(run_dir, "metrics.jsonl", "train") | _expected(run_dir, "epochs.jsonl", "epoch")


@pytest.mark.slow  # end-to-end training runs (seconds each)
def test_pretraining_and_finetuning_scalars_equal_the_jsonl(tiny_overrides: list[str]) -> None:
    settings = load_settings("fmnist_demo", [*tiny_overrides, "run.tensorboard=true"], environ={})
    result = train(settings, console=QUIET)
    assert list(result.run_dir.glob("events.out.tfevents.*"))
    found = _scalars(result.run_dir)
    expected = _logged(result.run_dir)
    assert {"train/loss", "train/lr", "train/target_confidence", "epoch/support_accuracy"} <= set(expected)
    assert [s for s, _ in found["train/loss"]] == [4, 8, 12, 16, 20, 24, 28, 32]
    _assert_same(found, expected)

    weights = load_pretrained(result.checkpoint)
    ft_overrides = ["finetune.batch_size=4", "finetune.epochs=2", "run.name=tiny_ft", "run.tensorboard=true"]
    ft_settings, _ = resolve_settings(weights, None, ft_overrides, environ={}, new_run=True)
    finetuned = run_finetune(ft_settings, weights, console=QUIET, default_name="tiny_ft")
    ft_dir = Path(finetuned.run_dir)
    expected = _logged(ft_dir)
    assert "epoch/heldout_top1" in expected
    _assert_same(_scalars(ft_dir), expected)


@pytest.mark.slow  # end-to-end training runs (seconds each)
def test_resumed_run_shows_each_step_once(tiny_overrides: list[str], tmp_path: Path) -> None:
    """A run killed after step 12 whose last checkpoint is step 8: TensorBoard hides the killed session's
    steps beyond 8 (purge_step), as the JSONL drops them, and shows the resumed values."""
    common = [*tiny_overrides, "run.tensorboard=true"]
    first = train(load_settings("fmnist_demo", [*common, "run.max_steps=8"], environ={}), console=QUIET)
    at_8 = tmp_path / "checkpoint-step8.pt"
    shutil.copy(first.checkpoint, at_8)
    train(load_settings("fmnist_demo", [*common, "run.max_steps=12"], environ={}), console=QUIET, resume=True)
    shutil.copy(at_8, first.checkpoint)  # the checkpoint a kill after step 12 (before its save) would leave
    done = train(load_settings("fmnist_demo", common, environ={}), console=QUIET, resume=True)
    found = _scalars(done.run_dir)
    expected = _logged(done.run_dir)
    assert [s for s, _ in expected["train/loss"]] == [4, 8, 12, 16, 20, 24, 28, 32]
    _assert_same(found, expected)


def test_missing_tensorboard_is_a_clear_error(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the extra were not installed
    settings = load_settings("fmnist_demo", [*tiny_overrides, "run.tensorboard=true"], environ={})
    with pytest.raises(ValueError, match=r"run\.tensorboard=true .*pip install 'paws-cli\[tensorboard\]'"):
        train(settings, console=QUIET)
    assert not (Path(settings.run.out_dir) / "tiny").exists()  # it failed before creating anything
