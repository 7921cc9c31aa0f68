"""The small-data fine-tuning protocol (issue 15): a classifier started from the class prototypes of the PAWS-NN
embedding, a smaller lr for the pretrained layers, selection by held-out loss or none (the last epoch), label
smoothing; and SimCLRv2's protocol unchanged by default."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from paws_cli.config import load_settings
from paws_cli.config.schema import FinetuneSettings
from paws_cli.data.augment.views import eval_transform
from paws_cli.data.backends.memory import as_nchw
from paws_cli.data.datasets.arrays import load_array_dataset
from paws_cli.finetune.model import build_finetune_model, prototype_weights
from paws_cli.finetune.progress import selection_text
from paws_cli.finetune.setup import FinetuneRun, set_up
from paws_cli.finetune.train import is_better, run_finetune
from paws_cli.methods.paws import PAWSModel
from paws_cli.models import PAWSEncoder, create_encoder
from paws_cli.pretrained import load_pretrained, resolve_settings
from paws_cli.train.checkpoint_io import load_checkpoint, save_checkpoint
from paws_cli.train.rundir import release_run_dir, run_dir_of

QUIET = Console(quiet=True)
FT = ["finetune.batch_size=4", "finetune.epochs=2", "finetune.lr=0.05", "run.num_threads=1"]
SMALL_DATA = [
    "finetune.keep_projection_layers=2",
    "finetune.normalize_features=true",
    "finetune.classifier_init=prototypes",
    "finetune.backbone_lr_scale=0.1",
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _encoder(pred: int | None = None, layers: int = 2) -> PAWSEncoder:
    torch.manual_seed(0)
    encoder = create_encoder("cnn_w16", 1, 64, 64, layers, pred)
    with torch.no_grad():  # non-trivial BatchNorm statistics: eval mode must matter
        for name, tensor in encoder.state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape) * 0.1)
    return encoder.eval()


@pytest.fixture()
def pretrained(tiny_overrides: list[str], tmp_path: Path) -> Path:
    """A toolkit pretraining checkpoint (random cnn_w16 encoder) of the tiny dataset's settings."""
    settings = load_settings("fmnist_demo", tiny_overrides, environ={})
    payload = {
        "method": "paws",
        "settings": settings.model_dump(mode="json"),
        "model": PAWSModel(_encoder()).state_dict(),
    }
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    return save_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint.pt", payload)


def _set_up(checkpoint: Path, overrides: list[str]) -> FinetuneRun:
    weights = load_pretrained(checkpoint)
    settings, _ = resolve_settings(weights, None, [*FT, *overrides], environ={}, new_run=True)
    return set_up(settings, weights, resume=False, overwrite=False, console=QUIET, name="tiny_finetune")


def _reference_prototype_probs(
    queries: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, tau: float
) -> torch.Tensor:
    """Nearest-prototype class probabilities in float64, written out: unit embeddings, per-class mean, unit
    prototypes, softmax of cosine / tau."""
    q = queries.double() / queries.double().norm(dim=1, keepdim=True)
    b = bank.double() / bank.double().norm(dim=1, keepdim=True)
    protos = []
    for c in range(int(labels.max()) + 1):
        mean = b[labels == c].mean(dim=0)
        protos.append(mean / mean.norm())
    return torch.softmax(q @ torch.stack(protos).T / tau, dim=1)


def test_prototype_init_starts_as_nearest_prototype_on_the_paws_nn_embedding() -> None:
    encoder = _encoder()
    gen = torch.Generator().manual_seed(1)
    bank_x, queries_x = torch.randn(12, 1, 16, 16, generator=gen), torch.randn(7, 1, 16, 16, generator=gen)
    labels = torch.tensor([0, 1, 2] * 4)
    with torch.no_grad():  # PAWS-NN's embedding: the whole projection head (no prediction head here)
        bank, queries = encoder.embed(bank_x, "projection"), encoder.embed(queries_x, "projection")
    expected = _reference_prototype_probs(queries, bank, labels, tau=0.1)

    model = build_finetune_model(encoder, 3, keep_projection_layers=2, mode="full", normalize=True).eval()
    with torch.no_grad():
        model.init_from_prototypes(model.features(bank_x), labels, tau=0.1)
        probs = torch.softmax(model(queries_x).double(), dim=1)
    assert torch.allclose(probs, expected, atol=1e-5)
    assert torch.equal(probs.argmax(1), expected.argmax(1))
    assert not model.classifier.bias.any()
    # rows are unit prototypes over tau, computed in float64
    weight = prototype_weights(bank, labels, 3, tau=0.5)
    assert weight.dtype == torch.float64 and torch.allclose(
        weight.norm(dim=1), torch.full((3,), 2.0, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="classes \\[3\\] have none"):
        prototype_weights(bank, labels, 4, tau=0.1)


def test_prototype_init_on_the_prediction_embedding_matches_the_nn_embedding() -> None:
    """keep_prediction_head: the classifier starts as nearest-prototype over ``embed(x, 'prediction')``, the
    embedding SemPPL-NN (eval.embedding=auto) classifies with; the projection output alone gives another one."""
    encoder = _encoder(pred=32)
    gen = torch.Generator().manual_seed(2)
    bank_x, queries_x = torch.randn(12, 1, 16, 16, generator=gen), torch.randn(9, 1, 16, 16, generator=gen)
    labels = torch.tensor([0, 1, 2] * 4)
    with torch.no_grad():
        bank, queries = encoder.embed(bank_x, "prediction"), encoder.embed(queries_x, "prediction")
        projected = encoder.embed(queries_x, "projection")
    expected = _reference_prototype_probs(queries, bank, labels, tau=0.1)

    model = build_finetune_model(
        encoder, 3, keep_projection_layers=2, mode="full", normalize=True, keep_prediction_head=True
    ).eval()
    assert model.head.prediction is encoder.prediction  # shared, not copied
    with torch.no_grad():
        assert torch.allclose(model.features(queries_x), F.normalize(queries, dim=1), atol=1e-6)
        assert not torch.allclose(model.features(queries_x), F.normalize(projected, dim=1), atol=1e-3)
        model.init_from_prototypes(model.features(bank_x), labels, tau=0.1)
        probs = torch.softmax(model(queries_x).double(), dim=1)
    assert torch.allclose(probs, expected, atol=1e-5)
    # the predictor reads the whole projection head, and the checkpoint must have one
    with pytest.raises(ValueError, match="keep_projection_layers=2, got 1"):
        build_finetune_model(encoder, 3, keep_projection_layers=1, mode="full", keep_prediction_head=True)
    with pytest.raises(ValueError, match="it has none"):
        build_finetune_model(_encoder(), 3, keep_projection_layers=2, mode="full", keep_prediction_head=True)


def test_run_starts_from_the_training_images_prototypes(pretrained: Path, tiny_dataset: Path) -> None:
    run = _set_up(pretrained, SMALL_DATA)
    try:
        data = load_array_dataset(tiny_dataset)
        ids = torch.as_tensor(run.splits.train)
        x = eval_transform(as_nchw(data.train_images)[ids], data.mean, data.std)
        encoder = load_pretrained(pretrained).build_encoder()
        with torch.no_grad():
            bank = encoder.embed(x, "projection")
        labels = torch.as_tensor(np.asarray(data.train_labels))[ids]
        expected = _reference_prototype_probs(bank, bank, labels, tau=run.settings.finetune.prototype_tau)
        run.model.eval()
        with torch.no_grad():
            probs = torch.softmax(run.model(x).double(), dim=1)
        assert torch.allclose(probs, expected, atol=1e-5)
    finally:
        release_run_dir(run_dir_of(run.settings, "tiny_finetune"))


def test_backbone_lr_scale_reaches_the_optimiser_groups(pretrained: Path) -> None:
    run = _set_up(pretrained, SMALL_DATA)
    try:
        classifier = {id(p) for p in run.model.classifier.parameters()}
        pretrained_ids = {id(p) for p in (*run.model.backbone.parameters(), *run.model.head.parameters())}
        total = run.total_steps
        for step in (0, 3, total - 2):
            peak = 0.5 * 0.05 * (1 + math.cos(math.pi * step / (total - 1)))
            assert run.schedule.set(step) == pytest.approx(peak, abs=1e-12)
            seen = set()
            for group in run.optimizer.param_groups:
                ids = {id(p) for p in group["params"]}
                seen |= ids
                if ids <= classifier:
                    assert group["lr"] == pytest.approx(peak, abs=1e-12)
                else:
                    assert ids <= pretrained_ids and group["lr"] == pytest.approx(0.1 * peak, abs=1e-12)
            assert seen == classifier | pretrained_ids  # every trainable parameter, each in one group
    finally:
        release_run_dir(run_dir_of(run.settings, "tiny_finetune"))


def test_selection_rules_on_a_hand_made_sequence() -> None:
    losses = [0.9, 0.5, 0.7, 0.5, 0.8]
    top1 = [50.0, 70.0, 80.0, 80.0, 60.0]

    def selected(select: str) -> int:
        best = None
        for epoch, (loss, acc) in enumerate(zip(losses, top1, strict=True), start=1):
            scores = {"heldout_loss": loss, "heldout_top1": acc}
            if is_better(select, scores, best):
                best = {"epoch": epoch, **scores}
        assert best is not None
        return int(best["epoch"])

    assert selected("loss") == 2  # the (earliest) argmin of the held-out loss
    assert selected("accuracy") == 4  # the best top-1, the later of tied epochs
    assert selected("last") == 5


def test_no_held_out_images_train_on_all_and_test_the_last_epoch(pretrained: Path) -> None:
    weights = load_pretrained(pretrained)
    base = [*FT, *SMALL_DATA, "finetune.val_per_class=0"]
    settings, _ = resolve_settings(weights, None, base, environ={}, new_run=True)
    with pytest.raises(ValueError, match=r"finetune\.select=last"):
        run_finetune(settings, weights, console=QUIET, default_name="tiny_finetune")
    settings, _ = resolve_settings(
        weights,
        None,
        [*base, "finetune.select=last", "finetune.label_smoothing=0.1"],
        environ={},
        new_run=True,
    )
    result = run_finetune(settings, weights, console=QUIET, default_name="tiny_finetune", overwrite=True)
    assert result.heldout_images == 0 and result.train_images == 16 and result.select == "last"
    assert result.selected_epoch == 2 and result.heldout_top1 is None and result.test_top1 is not None
    assert selection_text(result).startswith(
        "the last epoch (2) of 2, trained on 16 labelled images; test top-1"
    )
    last, best = load_checkpoint(result.checkpoint), load_checkpoint(result.best_checkpoint)
    for key, value in last["model"].items():
        assert torch.equal(value, best["model"][key]), key
    # the kept projection head maps back to the encoder's names
    assert set(load_pretrained(result.best_checkpoint).part("projection.")) == {
        k[len("projection.") :] for k in _encoder().state_dict() if k.startswith("projection.")
    }


def test_a_fine_tuned_prediction_head_maps_back_to_the_encoders(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """keep_prediction_head=true (SemPPL's embedding): the run trains the predictor under the classifier, and
    its fine-tuning checkpoint loads as an encoder with that prediction head (``head.prediction.*``)."""
    settings = load_settings("fmnist_demo", [*tiny_overrides, "model.pred_hidden_dim=32"], environ={})
    encoder = _encoder(pred=32)
    payload = {
        "method": "paws",
        "settings": settings.model_dump(mode="json"),
        "model": PAWSModel(encoder).state_dict(),
    }
    (tmp_path / "runs" / "pred").mkdir(parents=True)
    checkpoint = save_checkpoint(tmp_path / "runs" / "pred" / "checkpoint.pt", payload)
    weights = load_pretrained(checkpoint)
    overrides = [*FT, *SMALL_DATA, "finetune.keep_prediction_head=true", "finetune.val_per_class=0"]
    ft_settings, _ = resolve_settings(
        weights, None, [*overrides, "finetune.select=last"], environ={}, new_run=True
    )
    result = run_finetune(ft_settings, weights, console=QUIET, default_name="tiny_finetune")
    tuned = load_pretrained(result.best_checkpoint)
    saved = load_checkpoint(result.best_checkpoint)["model"]
    before = {
        k[len("prediction.") :]: v for k, v in encoder.state_dict().items() if k.startswith("prediction.")
    }
    after = tuned.part("prediction.")
    assert set(after) == set(before)
    for name, value in after.items():
        assert torch.equal(value, saved[f"head.prediction.{name}"]), name
    assert not torch.equal(after["fc2.weight"], before["fc2.weight"])  # it trained (backbone_lr_scale 0.1)
    assert tuned.architecture.pred_hidden_dim == 32  # e.g. `paws export` of it keeps the predictor's shape


def test_defaults_keep_simclrv2s_protocol(pretrained: Path) -> None:
    ft = FinetuneSettings()
    assert (ft.keep_projection_layers, ft.classifier_init, ft.normalize_features) == (1, "zero", False)
    assert (ft.backbone_lr_scale, ft.select, ft.label_smoothing, ft.lr, ft.epochs) == (
        1.0,
        "accuracy",
        0.0,
        0.02,
        50,
    )
    run = _set_up(pretrained, [])
    try:
        assert not run.model.classifier.weight.any() and not run.model.normalize
        groups = run.optimizer.param_groups
        assert len(groups) == 2 and not any("lr_scale" in g for g in groups)
        run.schedule.set(1)
        assert groups[0]["lr"] == groups[1]["lr"]
    finally:
        release_run_dir(run_dir_of(run.settings, "tiny_finetune"))


def test_demo_recipe_uses_the_small_data_protocol_and_60pc_simclrv2s() -> None:
    demo = load_settings("fmnist_demo", [], environ={}).finetune
    assert (demo.classifier_init, demo.normalize_features, demo.keep_projection_layers) == (
        "prototypes",
        True,
        2,
    )
    assert (demo.backbone_lr_scale, demo.select, demo.val_per_class, demo.epochs) == (0.01, "last", 0, 50)
    sixty = load_settings("fmnist_60pc", [], environ={}).finetune
    assert (sixty.classifier_init, sixty.normalize_features, sixty.keep_projection_layers) == (
        "zero",
        False,
        1,
    )
    assert (sixty.backbone_lr_scale, sixty.select, sixty.val_per_class) == (1.0, "accuracy", 2)
    # SemPPL's demo: SimCLRv2's classifier (chosen on validation), on all 100 labels for the same 50 epochs
    semppl = load_settings("semppl_fmnist_demo", [], environ={}).finetune
    assert (semppl.classifier_init, semppl.normalize_features, semppl.keep_projection_layers) == (
        "zero",
        False,
        1,
    )
    assert (semppl.backbone_lr_scale, semppl.select, semppl.val_per_class, semppl.epochs) == (
        1.0,
        "last",
        0,
        50,
    )
    assert semppl.lr == demo.lr and (semppl.crop_scale, demo.crop_scale) == ((0.3, 1.0), (0.75, 1.0))


def test_the_demo_trains_its_supervised_baseline_with_the_baselines_own_recipe() -> None:
    from paws_cli.demo import supervised_recipe_for

    assert supervised_recipe_for("fmnist_demo") == "supervised_fmnist_demo"
    assert supervised_recipe_for("fmnist_60pc") == "supervised_fmnist_60pc"
    # none of its own: the demo recipe's settings
    assert supervised_recipe_for("r50_10pct") == "r50_10pct"
    baseline = load_settings("supervised_fmnist_demo", [], environ={})
    demo = load_settings("fmnist_demo", [], environ={})
    assert (baseline.method, baseline.optim.lr, demo.optim.lr) == ("supervised", 2.0, 1.0)
    assert baseline.augment == demo.augment and baseline.supervised == demo.supervised
