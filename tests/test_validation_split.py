"""The validation split (`knn-eval --on val`, `paws sweep`): held-out train images, never the test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from paws_cli.config import Settings, load_settings
from paws_cli.data.backends.eval_data import MemoryEvalData, build_eval_data
from paws_cli.data.datasets.arrays import write_array_dataset
from paws_cli.eval.knn_eval import KnnResult, _evaluate
from paws_cli.eval.validation import check_labels_hidden, validation_indices, validation_view


def test_indices_are_held_out_balanced_and_seeded() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=2000)
    labelled = np.sort(np.concatenate([np.flatnonzero(labels == c)[:7] for c in range(5)]))
    ids = validation_indices(labels, labelled, num_classes=5, val_images=503, seed=3)
    assert len(ids) == 500 and len(np.unique(ids)) == 500  # 503 // 5 = 100 per class
    assert np.bincount(labels[ids], minlength=5).tolist() == [100] * 5
    assert not set(ids.tolist()) & set(labelled.tolist())
    again = validation_indices(labels, labelled, num_classes=5, val_images=503, seed=3)
    assert np.array_equal(ids, again)
    other = validation_indices(labels, labelled, num_classes=5, val_images=503, seed=4)
    assert not np.array_equal(ids, other)


def test_too_large_a_split_names_the_setting() -> None:
    labels = np.repeat(np.arange(2), 5)
    with pytest.raises(ValueError, match=r"eval.val_images=10 \(5 per class\).*Lower eval.val_images"):
        validation_indices(labels, np.array([0, 5]), num_classes=2, val_images=10, seed=0)
    with pytest.raises(ValueError, match="at least 3"):
        validation_indices(np.repeat(np.arange(3), 4), np.array([0]), num_classes=3, val_images=2, seed=0)


# A hand-checkable dataset: class 0 is bright on the left half, class 1 on the right half. Train indices 0-5 are
# class 0 and 6-11 class 1; index 5 is labelled 0 but drawn like class 1, so PAWS-NN on raw pixels gets it wrong.
LEFT, RIGHT = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
LEFT[:, :2], RIGHT[:, 2:] = 200, 200
LABELLED = np.array([0, 1, 6, 7])
ODD = 5


def _write(path: Path, *, poison_test: bool) -> Path:
    train = np.stack([LEFT] * 5 + [RIGHT] + [RIGHT] * 6)
    train_labels = np.repeat(np.arange(2), 6)
    test = np.stack([LEFT, LEFT, RIGHT, RIGHT])
    test_labels = np.array([0, 0, 1, 1])
    if poison_test:  # every test image drawn like the other class
        test = test[::-1].copy()
    write_array_dataset(path, "halves", (train, train_labels), (test, test_labels), ["left", "right"], "test")
    return path


class PixelEncoder(torch.nn.Module):
    """Embeds an image as its normalised pixels, so the result can be checked by hand."""

    prediction = None

    def embed(self, x: Tensor, which: str) -> Tensor:
        return x.flatten(1)


def _settings(path: Path, val_images: int) -> Settings:
    return load_settings(None, ["data.dataset=array", f"data.path={path}", f"eval.val_images={val_images}"])


def _score(settings: Settings, on: str, dataset: MemoryEvalData | None = None) -> KnnResult:
    encoder = PixelEncoder()
    data = dataset or build_eval_data(settings)
    return _evaluate(encoder, (encoder, "backbone"), settings, data, LABELLED, "hand-made bank", "pixels", on)


def test_hand_checked_result_and_the_test_set_is_never_read(tmp_path: Path) -> None:
    clean = _settings(_write(tmp_path / "clean", poison_test=False), val_images=8)
    poisoned = _settings(_write(tmp_path / "poisoned", poison_test=True), val_images=8)
    # 8 = every train image outside the labelled subset: 2..5 and 8..11; only index 5 is misclassified
    val = _score(clean, "val")
    assert (val.queries, val.bank_size, val.on) == (8, 4, "val")
    assert val.paws_nn_top1 == pytest.approx(87.5) and val.knn_top1 == pytest.approx(87.5)
    assert (
        val.queries_from
        == "validation split (8 train images outside the labelled subset, 4 per class, seed 0)"
    )
    # the poison is real: test accuracy goes from 100 to 0 ...
    assert _score(clean, "test").paws_nn_top1 == 100.0 and _score(poisoned, "test").paws_nn_top1 == 0.0
    # ... and the validation result does not move
    assert _score(poisoned, "val").as_dict() | {"checkpoint": ""} == val.as_dict() | {"checkpoint": ""}


def test_validation_reads_only_train_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(_write(tmp_path / "d", poison_test=False), val_images=4)
    dataset = build_eval_data(settings)
    assert isinstance(dataset, MemoryEvalData)

    def no_test(*args: object, **kwargs: object) -> None:
        raise AssertionError("the test split was read")

    monkeypatch.setattr(dataset, "query_batches", no_test)
    ids = validation_indices(dataset.train_labels, LABELLED, num_classes=2, val_images=4, seed=0)
    result = _score(settings, "val", dataset)
    # 2 per class from the pool {2..5} and {8..11}: wrong exactly when the odd image is drawn
    assert set(ids.tolist()) <= {2, 3, 4, 5, 8, 9, 10, 11} and len(ids) == 4
    assert result.paws_nn_top1 == pytest.approx(100.0 * (4 - int(ODD in ids)) / 4)
    view = validation_view(dataset, LABELLED, settings.eval)
    (images, labels), *_ = list(view.query_batches(16))
    assert labels.tolist() == dataset.train_labels[ids].tolist()
    expected = np.stack([LEFT] * 5 + [RIGHT] * 7)[ids]
    assert torch.equal(images[:, 0] > 0, torch.as_tensor(expected > 0))


def test_oracle_pseudo_labels_are_refused() -> None:
    settings = load_settings("semppl_fmnist_demo", ["semppl.pseudo_labels=oracle"])
    with pytest.raises(ValueError, match="pseudo_labels=oracle"):
        check_labels_hidden(settings)
    check_labels_hidden(load_settings("semppl_fmnist_demo"))
