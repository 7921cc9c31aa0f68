"""The data pipeline: batch layout, labels aligned with images, per-step determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from paws_cli.config import load_settings
from paws_cli.data.backends.memory import TrainData, labelled_indices
from paws_cli.data.datasets.arrays import load_array_dataset, write_array_dataset


@pytest.fixture(scope="module")
def constant_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every image of class c is the constant 40 * (c + 1): a view's mean pixel reveals its source class."""
    out = tmp_path_factory.mktemp("const") / "ds"
    labels = np.repeat(np.arange(5), 20)
    rng = np.random.default_rng(1)
    labels = labels[rng.permutation(len(labels))].astype(np.int64)
    images = (40 * (labels + 1)).astype(np.uint8)[:, None, None] * np.ones((1, 12, 12), np.uint8)
    write_array_dataset(out, "const", (images, labels), (images[:10], labels[:10]), list("abcde"), "tests")
    return out


def _data(path: Path, *extra: str) -> TrainData:
    settings = load_settings(
        "fmnist_demo",
        [
            "data.dataset=array",
            f"data.path={path}",
            "data.labels_per_class=6",
            "augment.large_size=12",
            "augment.small_size=8",
            "augment.num_small=3",
            "augment.jitter_p=0",
            "augment.support_views=2",
            "paws.classes_per_batch=5",
            "paws.images_per_class=3",
            "optim.batch_size=8",
            *extra,
        ],
        environ={},
    )
    dataset = load_array_dataset(path)
    labelled, _ = labelled_indices(settings.data, dataset)
    return TrainData(settings, dataset, labelled, device=torch.device("cpu"))


def _class_of(view: torch.Tensor, data: TrainData) -> torch.Tensor:
    mean, std = data.augment.mean[0], data.augment.std[0]
    raw = view.mean(dim=(1, 2, 3)) * std + mean
    return torch.round(raw * 255 / 40).long() - 1


def test_batch_layout_and_labels_follow_images(constant_dataset: Path) -> None:
    data = _data(constant_dataset)
    assert data.steps_per_epoch == 100 // 8
    batch = next(data.epoch(0, first_step=0))
    assert [tuple(v.shape) for v in batch.views] == [(8, 1, 12, 12)] * 2 + [(8, 1, 8, 8)] * 3
    assert [tuple(v.shape) for v in batch.supports] == [(15, 1, 12, 12)] * 2
    for view in batch.supports:
        torch.testing.assert_close(_class_of(view, data), batch.support_classes, rtol=0, atol=0)
    # every view of row i comes from the same image
    first = _class_of(batch.views[0], data)
    for view in batch.views[1:]:
        assert torch.equal(_class_of(view, data), first)
    # P rounds of one image per class
    assert torch.equal(batch.support_classes[:5].sort().values, torch.arange(5))
    assert torch.equal(batch.support_classes[:5], batch.support_classes[5:10])


def test_views_are_a_function_of_seed_and_step(constant_dataset: Path, tiny_dataset: Path) -> None:
    a = next(
        _data(tiny_dataset, "data.labels_per_class=4", "paws.classes_per_batch=4").epoch(0, first_step=3)
    )
    b = next(
        _data(tiny_dataset, "data.labels_per_class=4", "paws.classes_per_batch=4").epoch(0, first_step=3)
    )
    c = next(
        _data(tiny_dataset, "data.labels_per_class=4", "paws.classes_per_batch=4").epoch(0, first_step=4)
    )
    for x, y, z in zip(a.views + a.supports, b.views + b.supports, c.views + c.supports, strict=True):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)


def test_split_file_must_be_an_index_split(tiny_dataset: Path, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("n01440764_1.JPEG\nn01440764_2.JPEG\n")
    with pytest.raises(ValueError, match="lists file names"):
        _data(tiny_dataset, f"data.split={names}", "data.labels_per_class=null")
    with pytest.raises(FileNotFoundError):
        _data(tiny_dataset, f"data.split={tmp_path / 'missing.txt'}")
