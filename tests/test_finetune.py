"""`paws finetune`: the kept layers and the zero classifier, the linear probe, the schedule, selection on held-out
images (never the test set), exact resume, and the command line."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config import load_settings
from paws_cli.data.augment.views import ViewSpec, eval_transform
from paws_cli.data.backends.memory import as_nchw, labelled_indices
from paws_cli.data.datasets.arrays import load_array_dataset, write_array_dataset
from paws_cli.data.splits.files import write_split
from paws_cli.finetune.data import EvalGeometry, FinetuneBatches, evaluate, make_finetune_splits
from paws_cli.finetune.model import FinetuneModel, build_finetune_model
from paws_cli.finetune.train import run_finetune
from paws_cli.methods.paws import PAWSModel
from paws_cli.models import PAWSEncoder, create_encoder
from paws_cli.pretrained import load_pretrained, resolve_settings
from paws_cli.train.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
from paws_cli.train.guards import TrainingInterruptedError
from paws_cli.train.rundir import RunDirError

pytestmark = pytest.mark.slow  # end-to-end fine-tuning runs (seconds each); make test runs them

QUIET = Console(quiet=True)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread (small inputs gain nothing from more; robust on a busy machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FT = ["finetune.batch_size=4", "finetune.epochs=4", "finetune.lr=0.05", "run.num_threads=1"]


def _encoder(pred: int | None = None, layers: int = 2) -> PAWSEncoder:
    torch.manual_seed(0)
    encoder = create_encoder("cnn_w16", 1, 64, 64, layers, pred)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so "unchanged" means something
        for name, tensor in encoder.state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape) * 0.1)
    return encoder


@pytest.fixture()
def pretrained(tiny_overrides: list[str], tmp_path: Path) -> Path:
    """A toolkit pretraining checkpoint (random cnn_w16 encoder) of the tiny dataset's settings."""
    settings = load_settings("fmnist_demo", tiny_overrides, environ={})
    state = PAWSModel(_encoder()).state_dict()
    payload = {"method": "paws", "settings": settings.model_dump(mode="json"), "model": state}
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    return save_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint.pt", payload)


def _finetune(checkpoint: Path, overrides: list[str], console: Console = QUIET, **kwargs: object):
    weights = load_pretrained(checkpoint)
    settings, _ = resolve_settings(weights, None, [*FT, *overrides], environ={}, new_run=True)
    return run_finetune(settings, weights, console=console, default_name="tiny_finetune", **kwargs), settings


def _files(run_dir: str) -> dict[str, bytes]:
    """Every file of a run directory and its bytes (the lock file names the process holding it)."""
    return {p.name: p.read_bytes() for p in sorted(Path(run_dir).iterdir()) if p.name != ".lock"}


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """Send this process SIGINT (Ctrl-C) while the batch of global step ``at_step`` is being made."""
    batch = FinetuneBatches.batch

    def interrupting(self: FinetuneBatches, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step == at_step:
            # Only with the loop's handler installed: the default one would interrupt the test session.
            assert signal.getsignal(signal.SIGINT) not in (signal.SIG_DFL, signal.default_int_handler)
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, step)

    monkeypatch.setattr(FinetuneBatches, "batch", interrupting)


def test_model_keeps_backbone_and_first_projection_layer_with_zero_classifier() -> None:
    encoder = _encoder(pred=16, layers=3)
    model = build_finetune_model(encoder, 4, keep_projection_layers=1, mode="full")
    keys = set(model.state_dict())
    expected = {f"backbone.{k}" for k in encoder.backbone.state_dict()}
    expected |= {f"head.{k}" for k in encoder.projection.first.state_dict()} | {
        "classifier.weight",
        "classifier.bias",
    }
    assert keys == expected  # no middle/last projection layers, no prediction head
    assert model.classifier.in_features == 64
    assert not model.classifier.weight.any() and not model.classifier.bias.any()
    x = torch.randn(5, 1, 16, 16)
    logits = model(x)
    assert torch.equal(logits, torch.zeros(5, 4))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 0]))
    assert loss.item() == pytest.approx(math.log(4))
    bare = build_finetune_model(_encoder(), 4, keep_projection_layers=0, mode="full")
    assert bare.classifier.in_features == 64 and not any(k.startswith("head.") for k in bare.state_dict())
    with pytest.raises(ValueError, match="keep_projection_layers=0"):
        build_finetune_model(
            create_encoder("cnn_w16", 1, None, 8, 0, None), 4, keep_projection_layers=1, mode="full"
        )


def test_linear_probe_keeps_bn_in_eval_mode() -> None:
    model = build_finetune_model(_encoder(), 4, keep_projection_layers=1, mode="linear")
    model.train()
    frozen = [m for m in (*model.backbone.modules(), *model.head.modules())]
    assert model.training and not any(m.training for m in frozen)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "classifier.weight",
        "classifier.bias",
    ]


def test_linear_probe_leaves_backbone_bit_for_bit(pretrained: Path) -> None:
    result, _ = _finetune(pretrained, ["finetune.mode=linear"])
    before = load_checkpoint(pretrained)["model"]
    after = load_checkpoint(result.checkpoint)["model"]
    for key, value in after.items():
        if key.startswith("backbone."):
            assert torch.equal(value, before[f"encoder.{key}"]), key
        elif key.startswith("head."):
            assert torch.equal(value, before[f"encoder.projection.first.{key[5:]}"]), key
    assert after["classifier.weight"].abs().sum() > 0
    assert Path(result.run_dir).name == "tiny_finetune"


def test_full_finetuning_trains_everything_on_a_cosine(pretrained: Path, tmp_path: Path) -> None:
    result, settings = _finetune(pretrained, ["run.log_every=1"])
    state = load_checkpoint(result.checkpoint)
    before = load_checkpoint(pretrained)["model"]
    assert not torch.equal(state["model"]["backbone.stem.weight"], before["encoder.backbone.stem.weight"])
    for group in state["optimizer"]["param_groups"]:
        assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 0.0
    steps = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    total = result.steps
    assert total == 8 and [s["step"] for s in steps] == list(range(1, total + 1))
    for record in steps:  # lr used at step t (0-based): cosine from 0.05 to 0 at the last step, no warm-up
        t = record["step"] - 1
        assert record["lr"] == pytest.approx(
            0.5 * 0.05 * (1 + math.cos(math.pi * t / (total - 1))), abs=1e-12
        )
    assert settings.finetune.mode == "full" and result.complete


def test_splits_are_disjoint_and_per_class(tiny_dataset: Path, tiny_overrides: list[str]) -> None:
    settings = load_settings("fmnist_demo", [*tiny_overrides, "data.labels_per_class=6"], environ={})
    dataset = load_array_dataset(tiny_dataset)
    labelled, _ = labelled_indices(settings.data, dataset)
    splits = make_finetune_splits(settings, dataset, labelled)
    labels = dataset.train_labels
    assert np.intersect1d(splits.train, splits.heldout).size == 0
    assert np.array_equal(np.union1d(splits.train, splits.heldout), np.sort(labelled))
    assert np.bincount(labels[splits.heldout]).tolist() == [2, 2, 2, 2]
    assert splits.heldout.max() < len(labels)  # train-split indices: the test split is another array
    too_many = load_settings("fmnist_demo", [*tiny_overrides, "finetune.val_per_class=6"], environ={})
    with pytest.raises(ValueError, match=r"finetune\.val_per_class=6 would leave no training image"):
        make_finetune_splits(too_many, dataset, labelled)


def test_val_split_file_must_be_disjoint(
    tiny_dataset: Path, tiny_overrides: list[str], tmp_path: Path
) -> None:
    dataset = load_array_dataset(tiny_dataset)
    settings = load_settings("fmnist_demo", tiny_overrides, environ={})
    labelled, _ = labelled_indices(settings.data, dataset)
    others = np.setdiff1d(np.arange(len(dataset.train_labels)), labelled)[:10]
    write_split(tmp_path / "val.txt", others.tolist(), {"dataset": dataset.name})
    write_split(tmp_path / "bad.txt", [*others.tolist(), int(labelled[0])], {"dataset": dataset.name})
    good = load_settings(
        "fmnist_demo", [*tiny_overrides, f"finetune.val_split={tmp_path / 'val.txt'}"], environ={}
    )
    splits = make_finetune_splits(good, dataset, labelled)
    assert np.array_equal(splits.heldout, np.sort(others)) and np.array_equal(splits.train, np.sort(labelled))
    bad = load_settings(
        "fmnist_demo", [*tiny_overrides, f"finetune.val_split={tmp_path / 'bad.txt'}"], environ={}
    )
    with pytest.raises(ValueError, match="shares 1 images with the labelled subset"):
        make_finetune_splits(bad, dataset, labelled)


def test_selection_never_sees_the_test_set(pretrained: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """Scrambling the test labels changes the test score but not one number of the selection."""
    ds = load_array_dataset(tiny_dataset)
    scrambled = tmp_path / "scrambled"
    test_labels = np.random.default_rng(1).permutation(ds.test_labels)
    train, test = (ds.train_images, ds.train_labels), (ds.test_images, test_labels)
    write_array_dataset(scrambled, ds.name, train, test, ds.class_names, "tests")
    a, _ = _finetune(pretrained, ["finetune.epochs=6"])
    b, _ = _finetune(pretrained, ["finetune.epochs=6", f"data.path={scrambled}", "run.name=scrambled"])
    assert a.history == b.history and a.selected_epoch == b.selected_epoch
    assert a.test_top1 != b.test_top1
    held = [h["heldout_top1"] for h in a.history]
    assert a.selected_epoch == max(i + 1 for i, v in enumerate(held) if v == max(held))  # latest best epoch
    # best.pt holds the selected epoch's weights: recompute its held-out and test accuracy independently
    best = load_checkpoint(a.best_checkpoint)
    assert best["selection"]["epoch"] == a.selected_epoch
    model = build_finetune_model(_encoder(), 4, keep_projection_layers=1, mode="full")
    model.load_state_dict(best["model"])
    model.eval()
    heldout = torch.as_tensor(best["heldout_indices"])
    for images, labels, expected in (
        (as_nchw(ds.train_images)[heldout], torch.as_tensor(ds.train_labels)[heldout], a.heldout_top1),
        (as_nchw(ds.test_images), torch.as_tensor(ds.test_labels), a.test_top1),
    ):
        with torch.no_grad():
            predicted = model(eval_transform(images, ds.mean, ds.std)).argmax(dim=1)
        assert 100.0 * (predicted == labels).double().mean().item() == pytest.approx(expected)
    assert not set(heldout.tolist()) & set(torch.as_tensor(best["train_indices"]).tolist())


def test_resume_is_exact(pretrained: Path) -> None:
    straight, _ = _finetune(pretrained, ["run.name=straight"])
    first, _ = _finetune(pretrained, ["run.name=resumed", "run.max_steps=3"])
    assert not first.complete and first.steps == 3 and first.test_top1 is None
    resumed, _ = _finetune(pretrained, ["run.name=resumed"], resume=True)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert straight.history == resumed.history and straight.test_top1 == resumed.test_top1
    with pytest.raises(CheckpointError, match=r"finetune\.lr"):
        _finetune(pretrained, ["run.name=resumed", "finetune.lr=0.1"], resume=True)
    with pytest.raises(RunDirError, match="--resume"):
        _finetune(pretrained, ["run.name=resumed"])


def test_resume_of_a_finished_run_changes_nothing(pretrained: Path) -> None:
    done, _ = _finetune(pretrained, [])
    before = _files(done.run_dir)
    said = io.StringIO()
    again, _ = _finetune(pretrained, [], console=Console(file=said, width=300), resume=True)
    assert "already complete" in said.getvalue() and "nothing was changed" in said.getvalue()
    assert _files(done.run_dir) == before  # not one byte: logs, resolved settings, checkpoints, results
    assert again == done  # the stored results
    # Stopped between its last checkpoint and its results: --resume scores the selected epoch and writes them.
    (Path(done.run_dir) / "finetune.json").unlink()
    again, _ = _finetune(pretrained, [], resume=True)
    assert again.complete and again.test_top1 == done.test_top1 and again.history == done.history
    assert _files(done.run_dir).keys() == before.keys()
    assert {k: v for k, v in _files(done.run_dir).items() if k != "finetune.json"} == {
        k: v for k, v in before.items() if k != "finetune.json"
    }


def test_interrupted_finetune_saves_and_resumes_exactly(
    pretrained: Path, monkeypatch: pytest.MonkeyPatch, ctrl_c_enabled: None
) -> None:
    straight, _ = _finetune(pretrained, ["run.name=straight", "run.log_every=1"])
    _interrupt_at(monkeypatch, 2)  # during the third step, inside epoch 2 (2 steps per epoch)
    with pytest.raises(TrainingInterruptedError, match=r"SIGINT after step 3 .*--resume") as stopped:
        _finetune(pretrained, ["run.name=resumed", "run.log_every=1"])
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    state = load_checkpoint(stopped.value.checkpoint)
    assert state["step"] == 3 and not state["epoch_complete"] and state["sums"]["images"] == 4
    assert not (Path(straight.run_dir).parent / "resumed" / "finetune.json").exists()
    resumed, _ = _finetune(pretrained, ["run.name=resumed", "run.log_every=1"], resume=True)
    for name in ("checkpoint.pt", "best.pt"):
        a = load_checkpoint(Path(straight.run_dir) / name)
        b = load_checkpoint(Path(resumed.run_dir) / name)
        assert a["model"].keys() == b["model"].keys()
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (name, key)
    assert resumed.history == straight.history and resumed.selected_epoch == straight.selected_epoch
    assert (resumed.test_top1, resumed.test_top5) == (straight.test_top1, straight.test_top5)
    for log in ("metrics.jsonl", "epochs.jsonl"):
        assert (Path(resumed.run_dir) / log).read_bytes() == (Path(straight.run_dir) / log).read_bytes()


def test_cli_interrupted_finetune_exits_130(
    pretrained: Path, monkeypatch: pytest.MonkeyPatch, ctrl_c_enabled: None
) -> None:
    _interrupt_at(monkeypatch, 0)
    result = CliRunner().invoke(app, ["finetune", str(pretrained), *FT, "finetune.epochs=1"])
    assert result.exit_code == 130, result.output
    assert "--resume" in result.output
    assert load_checkpoint(pretrained.parent.parent / "tiny_finetune" / "checkpoint.pt")["step"] == 1


def test_batches_cover_the_epoch_and_are_step_functions() -> None:
    images = torch.randint(0, 255, (20, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(20) % 4
    train = np.arange(3, 17)  # 14 images: not a multiple of the global batch 2 x 4
    spec = ViewSpec(size=8, scale=(0.5, 1.0), jitter_p=0.0, grayscale_p=0.0)
    kwargs = dict(batch_size=4, spec=spec, mean=(0.5,), std=(0.25,), seed=3, device=torch.device("cpu"))
    ranks = [FinetuneBatches(images, labels, train, world_size=2, rank=r, **kwargs) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == 2
    seen = torch.cat([ranks[r].indices(s) for s in (2, 3) for r in (0, 1)])  # epoch 1
    assert len(seen) == 16 and set(seen.tolist()) == set(train.tolist())  # all 14, 2 wrapped around
    x1, y1 = ranks[1].batch(5)
    x2, y2 = FinetuneBatches(images, labels, train, world_size=2, rank=1, **kwargs).batch(5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (4, 1, 8, 8)


def test_evaluate_counts_top1_and_top5() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (37, 1, 6, 6), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 7, (37,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 7))
    scores = evaluate(
        model,
        images,
        labels,
        mean=(0.5,),
        std=(0.2,),
        geometry=EvalGeometry(),
        batch_size=8,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
    )
    with torch.no_grad():
        logits = model(eval_transform(images, (0.5,), (0.2,))).double()
    order = logits.argsort(dim=1, descending=True)
    assert scores["top1"] == pytest.approx(100 * (order[:, 0] == labels).double().mean().item())
    assert scores["top5"] == pytest.approx(
        100 * (order[:, :5] == labels[:, None]).any(1).double().mean().item()
    )
    assert EvalGeometry.for_images(28, 28) == EvalGeometry()
    assert EvalGeometry.for_images(256, 224) == EvalGeometry(size=224, resize=256)


def test_frozen_model_rejects_no_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        FinetuneModel(torch.nn.Identity(), None, 4, 0, frozen=False)


def test_cli_finetune_prints_the_table(pretrained: Path) -> None:
    result = CliRunner().invoke(app, ["finetune", str(pretrained), *FT, "finetune.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "held-out (selection, epoch 1)" in result.output and "finetune.json" in result.output
    assert (pretrained.parent.parent / "tiny_finetune" / "finetune.json").is_file()
    again = CliRunner().invoke(app, ["finetune", str(pretrained), *FT, "finetune.epochs=1"])
    assert again.exit_code == 2 and "--overwrite" in again.output
