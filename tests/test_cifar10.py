"""CIFAR-10 from its python-pickle folder: layout, order, statistics, the official index splits, training batches,
and clear errors for missing, corrupt or foreign batch files.

The tests write fake ``cifar-10-batches-py`` folders in the real format: pickled dicts with ``b'data'``
((N, 3072) uint8, the R, G and B planes of each 32x32 image), ``b'labels'``, ``b'batch_label'`` and
``b'filenames'``, plus ``batches.meta`` with ``b'label_names'``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from paws_cli.config.schema import DataSettings, Settings
from paws_cli.data.backends.eval_data import MemoryEvalData, build_eval_data
from paws_cli.data.backends.memory import labelled_indices, load_dataset
from paws_cli.data.datasets import cifar10
from paws_cli.data.sources import build_train_data
from paws_cli.data.splits.files import read_split

NAMES = [n.encode() for n in cifar10.CLASS_NAMES]


def _write_batch(path: Path, data: np.ndarray, labels: list[int], protocol: int = 2) -> None:
    content = {
        b"batch_label": path.name.encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    with open(path, "wb") as fh:
        pickle.dump(content, fh, protocol=protocol)


def make_fake_cifar(
    root: Path, per_batch: int = 12, test: int = 10, seed: int = 0, protocol: int = 2
) -> Path:
    """A cifar-10-batches-py folder with random images; returns the folder."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in (*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH):
        n = test if name == cifar10.TEST_BATCH else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        _write_batch(folder / name, data, rng.integers(0, 10, size=n).tolist(), protocol)
    with open(folder / cifar10.META_BATCH, "wb") as fh:
        pickle.dump(
            {b"label_names": NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, fh, protocol=2
        )
    return folder


def _raw(folder: Path, name: str) -> dict:
    with open(folder / name, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_cifar(tmp_path_factory.mktemp("cifar"))


def test_layout_order_and_labels(fake: Path) -> None:
    ds = cifar10.load_cifar10(fake)
    assert ds.name == "cifar10" and ds.class_names == list(cifar10.CLASS_NAMES)
    assert ds.train_images.shape == (60, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10, 32, 32, 3) and ds.image_shape == (32, 32, 3)
    # train = data_batch_1 .. data_batch_5 in order (the order the official index splits refer to)
    raws = [_raw(fake, name) for name in cifar10.TRAIN_BATCHES]
    assert ds.train_labels.tolist() == [label for raw in raws for label in raw[b"labels"]]
    assert ds.train_labels.dtype == np.int64
    # image k, row r, column c, channel ch is byte ch * 1024 + r * 32 + c of its row of 'data'
    data = np.concatenate([raw[b"data"] for raw in raws])
    rng = np.random.default_rng(1)
    for k, r, c, ch in zip(
        rng.integers(0, 60, 50),
        rng.integers(0, 32, 50),
        rng.integers(0, 32, 50),
        rng.integers(0, 3, 50),
        strict=True,
    ):
        assert ds.train_images[k, r, c, ch] == data[k, ch * 1024 + r * 32 + c]
    test = _raw(fake, cifar10.TEST_BATCH)
    assert ds.test_labels.tolist() == test[b"labels"]
    assert np.array_equal(ds.test_images[3, :, :, 1].reshape(-1), test[b"data"][3, 1024:2048])


def test_channel_statistics_are_exact(fake: Path) -> None:
    ds = cifar10.load_cifar10(fake)
    x = ds.train_images.astype(np.float64) / 255.0
    assert np.allclose(ds.mean, x.mean(axis=(0, 1, 2)), atol=1e-12)
    assert np.allclose(ds.std, x.std(axis=(0, 1, 2)), atol=1e-12)


def test_numpy2_pickles_and_str_keys_load(tmp_path: Path) -> None:
    folder = make_fake_cifar(tmp_path, protocol=pickle.HIGHEST_PROTOCOL)
    assert cifar10.load_cifar10(folder).train_images.shape == (60, 32, 32, 3)
    data = np.zeros((4, 3072), dtype=np.uint8)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({"data": data, "labels": [1, 2, 3, 4]}, fh)
    assert cifar10.read_batch(folder / "data_batch_2")[1].tolist() == [1, 2, 3, 4]
    (folder / cifar10.META_BATCH).unlink()  # the names are CIFAR-10's own without it
    assert cifar10.load_cifar10(folder).class_names == list(cifar10.CLASS_NAMES)


def test_settings_load_it_and_train_batches_come_from_memory(fake: Path) -> None:
    settings = Settings.model_validate(
        {
            "data": {"dataset": "cifar10", "path": str(fake), "labels_per_class": 1},
            "augment": {"large_size": 32, "large_scale": (0.75, 1.0), "small_size": 18, "num_small": 2},
            "paws": {"classes_per_batch": 2, "images_per_class": 1},
            "optim": {"batch_size": 16},
        }
    )
    # every class has at least one image in 60 random labels with this seed
    assert set(load_dataset(settings.data).train_labels.tolist()) == set(range(10))
    data = build_train_data(settings, device=torch.device("cpu"))
    assert (data.name, data.num_classes, data.in_chans, data.steps_per_epoch) == ("cifar10", 10, 3, 3)
    batch = next(iter(data.epoch(0, 0)))
    assert [tuple(v.shape) for v in batch.views] == [(16, 3, 32, 32)] * 2 + [(16, 3, 18, 18)] * 2
    assert batch.supports[0].shape == (2, 3, 32, 32)
    evaluation = build_eval_data(settings)
    assert isinstance(evaluation, MemoryEvalData)
    (images, labels), *_ = list(evaluation.query_batches(batch_size=4))
    expected = torch.from_numpy(evaluation.dataset.test_images[:4]).permute(0, 3, 1, 2).double() / 255
    mean, std = torch.tensor(evaluation.dataset.mean), torch.tensor(evaluation.dataset.std)
    expected = (expected - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert (
        torch.allclose(images.double(), expected, atol=1e-5)
        and labels.tolist() == evaluation.query_labels[:4].tolist()
    )


def test_official_index_splits_select_train_positions(tmp_path: Path) -> None:
    """A full-size fake (50,000 train images): the shipped 4000-label lists index data_batch_1..5 in order."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    all_labels = rng.integers(0, 10, size=50_000)
    data = np.zeros((10_000, 3072), dtype=np.uint8)
    for b, name in enumerate(cifar10.TRAIN_BATCHES):
        part = all_labels[b * 10_000 : (b + 1) * 10_000]
        data[:, 0] = np.arange(b * 10_000, (b + 1) * 10_000) // 256  # the image's position, in two bytes
        data[:, 1] = np.arange(b * 10_000, (b + 1) * 10_000) % 256
        _write_batch(folder / name, data.copy(), part.tolist())
    _write_batch(folder / cifar10.TEST_BATCH, data[:10].copy(), [0] * 10)
    cfg = DataSettings(dataset="cifar10", path=str(folder), split="official:cifar10-4000-73")
    ds = load_dataset(cfg)
    ids, description = labelled_indices(cfg, ds)
    listed = read_split("official:cifar10-4000-73").ids
    assert len(ids) == 4000 and ids.tolist() == np.asarray(listed).tolist()
    assert "4000 labelled images" in description
    positions = ds.train_images[ids, 0, 0, 0].astype(np.int64) * 256 + ds.train_images[ids, 0, 1, 0]
    assert positions.tolist() == ids.tolist()  # index i is the i-th image of data_batch_1..5
    assert ds.train_labels[ids].tolist() == all_labels[ids].tolist()


# ----------------------------------------------------------------------------------------------- errors


def test_missing_folder_and_batches(fake: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*nowhere does not exist.*cifar-10-batches-py"):
        cifar10.load_cifar10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"set data\.path=.*cifar-10-batches-py"):
        cifar10.load_cifar10(fake.parent)
    partial = make_fake_cifar(tmp_path / "partial")
    (partial / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 batch .*data_batch_3 is missing"):
        cifar10.load_cifar10(partial)
    with pytest.raises(ValueError, match=r"needs data\.path"):
        DataSettings(dataset="cifar10")


def test_corrupt_and_foreign_batches(tmp_path: Path) -> None:
    folder = make_fake_cifar(tmp_path)
    batch = folder / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:500])  # truncated download
    with pytest.raises(ValueError, match=r"data_batch_1 is corrupt or not a CIFAR-10 python batch"):
        cifar10.load_cifar10(folder)
    with open(batch, "wb") as fh:
        pickle.dump({b"data": np.zeros((3, 100), dtype=np.uint8), b"labels": [0, 1, 2]}, fh)
    with pytest.raises(ValueError, match=r"'data' is uint8 \(3, 100\), expected uint8 \(N, 3072\)"):
        cifar10.load_cifar10(folder)
    with open(batch, "wb") as fh:
        pickle.dump({b"data": np.zeros((3, 3072), dtype=np.uint8), b"fine_labels": [0, 1, 2]}, fh)
    with pytest.raises(ValueError, match=r"lacks 'data' or 'labels'.*CIFAR-100"):
        cifar10.load_cifar10(folder)
    with open(batch, "wb") as fh:
        pickle.dump({b"data": np.zeros((3, 3072), dtype=np.uint8), b"labels": [0, 1, 12]}, fh)
    with pytest.raises(ValueError, match=r"labels span \[0, 12\], outside 0\.\.9"):
        cifar10.load_cifar10(folder)
    with open(batch, "wb") as fh:
        pickle.dump({b"data": np.zeros((3, 3072), dtype=np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match="3 images but labels of shape"):
        cifar10.load_cifar10(folder)


class _Exploit:
    """A pickle that would run a command when loaded by a plain unpickler."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch should-not-exist",))


def test_a_pickle_that_runs_code_is_rejected_unrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_fake_cifar(tmp_path)
    monkeypatch.chdir(tmp_path)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": _Exploit(), b"labels": []}, fh)
    with pytest.raises(ValueError, match=r"test_batch is corrupt.*refers to (posix|os)\.system"):
        cifar10.load_cifar10(folder)
    assert not (tmp_path / "should-not-exist").exists()
