"""Evaluation images for every back end: the train split (labelled bank, held-out images) and the queries.

Batches are ``(images, labels)`` with the evaluation transform applied: float32 (n, C, s, s), normalised, on the
CPU. In-memory datasets (Fashion-MNIST, array datasets, CIFAR-10) are used as they are (spec section 7: "the
image itself"); an ImageFolder is resized to ``round(L * 256 / 224)`` on the shorter side and centre-cropped to
``L = augment.large_size`` (ImageNet's Resize 256 + CenterCrop 224, scaled to the training size), decoded by PIL
in DataLoader workers. Queries are the dataset's test split, or for an ImageFolder the folder ``data.val_path``
(its classes must be the train root's).

An unreadable image stops evaluation with its name under data.bad_images=stop; under 'skip' it is left out and
listed in ``EvalData.dropped`` (evaluation scores the images it could read, and says how many it could not).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from paws_cli.config.schema import DataSettings, Settings
from paws_cli.data.augment.views import eval_transform
from paws_cli.data.backends.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    collect_before_fork,
    decode_rgb,
    folder_labelled,
    scan_image_folder,
    worker_init,
)
from paws_cli.data.backends.memory import (
    as_nchw,
    describe_dataset,
    image_channels,
    labelled_indices,
    load_dataset,
)
from paws_cli.data.datasets.arrays import ArrayDataset

Batches = Iterator[tuple[Tensor, Tensor]]


class EvalData:
    """Evaluation images of one dataset (see the module doc). Subclasses implement the two batch streams."""

    name: str
    num_classes: int
    in_chans: int
    train_labels: np.ndarray  # int64, one per train image (indices of the bank refer to these)
    queries_name: str  # how messages name the queries ("test split", "val folder ...")

    def __init__(self) -> None:
        self.dropped: list[str] = []  # unreadable images left out (data.bad_images=skip)

    @property
    def query_labels(self) -> np.ndarray:
        """int64 label of every query image, in query order."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the dataset and its size."""
        raise NotImplementedError

    def labelled(self, cfg: DataSettings) -> tuple[np.ndarray, str]:
        """The labelled subset that ``cfg`` describes (indices into the train images) and its description."""
        raise NotImplementedError

    def train_batches(self, indices: Sequence[int] | np.ndarray, batch_size: int) -> Batches:
        """The train images ``indices`` (in that order) with their labels, evaluation transform applied."""
        raise NotImplementedError

    def query_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Batches:
        """The queries; with ``world_size`` > 1, this process's share (every world_size-th image from rank)."""
        raise NotImplementedError


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"eval batch size must be a positive integer, got {batch_size!r}")


class MemoryEvalData(EvalData):
    """An in-memory dataset's train and test arrays, normalised with the dataset's channel statistics."""

    def __init__(self, dataset: ArrayDataset) -> None:
        super().__init__()
        self.dataset = dataset
        self.name, self.num_classes, self.in_chans = (
            dataset.name,
            dataset.num_classes,
            image_channels(dataset),
        )
        self.train_labels = np.asarray(dataset.train_labels, dtype=np.int64)
        self._query_labels = np.asarray(dataset.test_labels, dtype=np.int64)
        self.queries_name = "test split"
        self._description = describe_dataset(dataset)

    @property
    def query_labels(self) -> np.ndarray:
        return self._query_labels

    def describe(self) -> str:
        return self._description

    def labelled(self, cfg: DataSettings) -> tuple[np.ndarray, str]:
        return labelled_indices(cfg, self.dataset)

    def _batches(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, batch_size: int) -> Batches:
        _check_batch_size(batch_size)
        mean, std = self.dataset.mean, self.dataset.std
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            x = eval_transform(as_nchw(images[chunk]), mean, std)
            yield x, torch.as_tensor(labels[chunk], dtype=torch.long)

    def train_batches(self, indices: Sequence[int] | np.ndarray, batch_size: int) -> Batches:
        ids = np.asarray(indices, dtype=np.int64)
        return self._batches(self.dataset.train_images, self.train_labels, ids, batch_size)

    def query_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Batches:
        ids = np.arange(rank, len(self.query_labels), world_size)
        return self._batches(self.dataset.test_images, self.query_labels, ids, batch_size)


def folder_eval_transform(size: int) -> T.Compose:
    """Resize the shorter side to round(size * 256 / 224), centre-crop ``size``; PIL image in, uint8 tensor out."""
    return T.Compose(
        [
            T.Resize(round(size * 256 / 224), interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(size),
            TF.pil_to_tensor,
        ]
    )


class _FolderImages(Dataset):
    """(uint8 image or None, label, path, error) of selected images of an ImageFolder."""

    def __init__(self, index: Any, ids: np.ndarray, size: int) -> None:
        self.index, self.ids, self.transform = index, ids, folder_eval_transform(size)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str, str | None]:
        image_id = int(self.ids[i])
        path = self.index.path(image_id)
        label = int(self.index.labels[image_id])
        try:
            image = decode_rgb(path)
        except Exception as exc:  # any decoding failure makes the file unusable; data.bad_images decides
            return None, label, path, f"{type(exc).__name__}: {exc}"
        return self.transform(image), label, path, None


def _collate_eval(items: list[tuple[Tensor | None, int, str, str | None]]) -> dict[str, Any]:
    good = [it for it in items if it[0] is not None]
    return {
        "images": torch.stack([it[0] for it in good]) if good else None,  # type: ignore[misc]
        "labels": torch.tensor([it[1] for it in good], dtype=torch.long),
        "failures": [(it[2], it[3]) for it in items if it[0] is None],
    }


class FolderEvalData(EvalData):
    """An ImageFolder train root (bank, held-out) and its val folder (queries), decoded in DataLoader workers."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        cfg = settings.data
        if cfg.path is None:
            raise ValueError("data.dataset=imagefolder needs data.path=<the ImageFolder train root>")
        self.cfg, self.size = cfg, settings.augment.large_size
        self.train = scan_image_folder(cfg.path)
        self._val: Any = None
        self.name, self.num_classes, self.in_chans = "imagefolder", len(self.train.classes), 3
        self.train_labels = self.train.labels
        self.queries_name = f"val folder {cfg.val_path}"
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @property
    def val(self) -> Any:
        """The val folder's index, scanned when queries are first needed."""
        if self._val is None:
            if self.cfg.val_path is None:
                raise ValueError(
                    "evaluating ImageFolder data needs data.val_path=<the ImageFolder val root> (queries); it "
                    "must have the same class folders as data.path"
                )
            val = scan_image_folder(self.cfg.val_path, key="data.val_path")
            if val.classes != self.train.classes:
                only_val = sorted(set(val.classes) - set(self.train.classes))[:5]
                only_train = sorted(set(self.train.classes) - set(val.classes))[:5]
                raise ValueError(
                    f"data.val_path={val.root} has {len(val.classes)} class folders and data.path={self.train.root} "
                    f"has {len(self.train.classes)}; they must be the same (only in val: {only_val}, only in "
                    f"train: {only_train})"
                )
            self._val = val
        return self._val

    @property
    def query_labels(self) -> np.ndarray:
        return self.val.labels

    def describe(self) -> str:
        return (
            f"imagefolder at {self.train.root}: {len(self.train)} train images, {self.num_classes} classes; "
            f"evaluated at {self.size}px (resize {round(self.size * 256 / 224)}, centre crop)"
        )

    def labelled(self, cfg: DataSettings) -> tuple[np.ndarray, str]:
        return folder_labelled(cfg, self.train)

    def _batches(self, index: Any, ids: np.ndarray, batch_size: int) -> Batches:
        _check_batch_size(batch_size)
        if len(ids) == 0:
            return
        if self.cfg.num_workers:
            collect_before_fork()
        loader = DataLoader(
            _FolderImages(index, ids, self.size),
            batch_size=batch_size,
            num_workers=min(self.cfg.num_workers, math.ceil(len(ids) / batch_size)),
            collate_fn=_collate_eval,
            worker_init_fn=worker_init if self.cfg.num_workers else None,
        )
        for raw in loader:
            if raw["failures"]:
                path, error = raw["failures"][0]
                if self.cfg.bad_images == "stop":
                    raise ValueError(
                        f"cannot read image {path}: {error}. Fix or remove the file, or set data.bad_images=skip "
                        "to leave unreadable images out of the evaluation"
                    )
                self.dropped += [p for p, _ in raw["failures"]]
            if raw["images"] is not None:
                yield (raw["images"].float().div_(255.0) - self.mean) * self.inv_std, raw["labels"]

    def train_batches(self, indices: Sequence[int] | np.ndarray, batch_size: int) -> Batches:
        return self._batches(self.train, np.asarray(indices, dtype=np.int64), batch_size)

    def query_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Batches:
        return self._batches(self.val, np.arange(rank, len(self.val), world_size), batch_size)


def build_eval_data(settings: Settings) -> EvalData:
    """Evaluation images for ``settings.data`` (see the module doc)."""
    cfg = settings.data
    if cfg.format == "memory":
        return MemoryEvalData(load_dataset(cfg))
    if cfg.format == "folder":
        return FolderEvalData(settings)
    raise ValueError(
        f"evaluation reads in-memory datasets and JPEG folders, not data.format={cfg.format}; evaluate a run "
        "trained on a .beton with data.format=folder, data.path=<its ImageFolder train root> and "
        "data.val_path=<the val root> (the .beton must hold every image of the train root, in ImageFolder order)"
    )
