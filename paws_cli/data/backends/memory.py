"""The in-memory back end, from settings to training batches: the dataset, the labelled subset, the samplers and
the views.

Shared by every method. Images live in memory as uint8 (N, C, H, W); a batch is gathered, moved to the training
device and augmented there with per-sample random draws. Every step's randomness comes from a generator seeded by
(run seed, rank, step) (:func:`paws_cli.data.sampling.batch.step_generator`), so a resumed run sees exactly the
views an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from paws_cli.config.schema import DataSettings, Settings
from paws_cli.data.augment.views import MultiCropAugment, view_specs
from paws_cli.data.datasets.arrays import ArrayDataset, load_array_dataset, resolve_fmnist
from paws_cli.data.needs import DataNeeds, needs_of
from paws_cli.data.sampling.batch import Batch, label_tables, step_generator
from paws_cli.data.sampling.samplers import build_samplers
from paws_cli.data.splits.files import make_balanced_split, read_split


def load_dataset(cfg: DataSettings) -> ArrayDataset:
    """The configured dataset (Fashion-MNIST is converted once into data.cache_dir when needed)."""
    if cfg.dataset == "fashion_mnist":
        return load_array_dataset(resolve_fmnist(cfg.path, cfg.root, cfg.cache_dir))
    if cfg.dataset == "imagefolder":
        raise ValueError(
            "data.dataset=imagefolder is not an in-memory dataset; its train and evaluation data come from "
            "paws_cli.data.sources (build_train_data, build_eval_data)"
        )
    if cfg.dataset == "cifar10":
        from paws_cli.data.datasets.cifar10 import load_cifar10  # only CIFAR runs need the pickle reader

        if cfg.path is None:
            raise ValueError("data.dataset=cifar10 needs data.path=<the cifar-10-batches-py folder>")
        return load_cifar10(cfg.path)
    if cfg.path is None:
        raise ValueError(
            "data.dataset=array needs data.path=DIR (a directory made by `paws convert-dataset`)"
        )
    return load_array_dataset(cfg.path)


def labelled_indices(cfg: DataSettings, dataset: ArrayDataset) -> tuple[np.ndarray, str]:
    """Indices of the labelled subset in the train split, and a one-line description of where they came from."""
    labels = dataset.train_labels
    if cfg.split is not None:
        split = read_split(cfg.split, num_train=len(labels))
        if split.kind != "index":
            raise ValueError(
                f"split file '{cfg.split}' lists file names, but dataset '{dataset.name}' is indexed by position; "
                "use an index split (e.g. from `paws make-splits`)"
            )
        ids = np.asarray(split.ids, dtype=np.int64)
        return ids, f"split file {cfg.split} ({len(ids)} labelled images)"
    ids = make_balanced_split(
        labels, per_class=cfg.labels_per_class, percent=cfg.label_percent, seed=cfg.split_seed
    )
    amount = (
        f"{cfg.labels_per_class} per class" if cfg.labels_per_class else f"{cfg.label_percent}% per class"
    )
    return ids, f"seeded class-balanced draw, {amount}, seed {cfg.split_seed} ({len(ids)} labelled images)"


def as_nchw(images: np.ndarray) -> Tensor:
    """uint8 (N,H,W) or (N,H,W,C) numpy -> contiguous uint8 (N,C,H,W) tensor."""
    tensor = torch.from_numpy(np.array(images, copy=True))  # a private, writable copy of a memory map
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    return tensor.contiguous()


def image_channels(dataset: ArrayDataset) -> int:
    shape = dataset.image_shape
    return 1 if len(shape) == 2 else int(shape[-1])


class TrainData:
    """Batches for one process: unlabelled views (if the method needs them) plus a class-balanced support batch."""

    def __init__(
        self,
        settings: Settings,
        dataset: ArrayDataset,
        labelled: np.ndarray,
        *,
        device: torch.device,
        world_size: int = 1,
        rank: int = 0,
        needs: DataNeeds | None = None,
        labelled_description: str = "",
    ) -> None:
        self.settings = settings
        self.device = device
        self.rank = rank
        self.needs = needs = needs_of(settings) if needs is None else needs
        # What the loop reports and builds the model from (the TrainDataLike protocol of data/sources.py).
        self.name, self.num_classes = dataset.name, dataset.num_classes
        self.in_chans = image_channels(dataset)
        self.labelled_description = labelled_description or f"{len(labelled)} labelled images"
        self.skipped_images = 0  # in-memory images are decoded once, when the dataset is made
        self.skipped_files: list[str] = []
        self._description = describe_dataset(dataset)
        self.images = as_nchw(dataset.train_images)
        if device.type == "cuda":
            self.images = self.images.pin_memory()
        train_labels = np.asarray(dataset.train_labels)
        self.labelled = torch.as_tensor(labelled, dtype=torch.long)
        self.labelled_classes = torch.as_tensor(train_labels[labelled], dtype=torch.long)
        self.order, self.supports = build_samplers(
            train_labels,
            labelled,
            needs,
            batch_size=settings.optim.batch_size,
            world_size=world_size,
            rank=rank,
            seed=settings.run.seed,
        )
        # Labels of the train images as the batch shows them: the label inside the labelled subset, else -1.
        self.train_labels, self.batch_labels = label_tables(train_labels, labelled)
        self.large, self.small = view_specs(settings.augment)
        self.augment = MultiCropAugment(
            large=self.large,
            small=self.small,
            num_large=2,
            num_small=settings.augment.num_small,
            mean=tuple(dataset.mean),
            std=tuple(dataset.std),
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    def describe(self) -> str:
        """One line naming the dataset and its size."""
        return self._description

    def state_dict(self) -> dict[str, dict[str, int]]:
        state = {"unlabelled": self.order.state_dict()}
        if self.supports is not None:
            state["supports"] = self.supports.state_dict()
        return state

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        self.order.load_state_dict(state["unlabelled"])
        if self.supports is not None:
            self.supports.load_state_dict(state["supports"])

    def _to_device(self, images: Tensor) -> Tensor:
        return images.to(self.device, non_blocking=True)

    def epoch(self, epoch: int, first_step: int) -> Iterator[Batch]:
        """The batches of `epoch`, from the samplers' current position; `first_step` is the global step of the
        first batch yielded (it seeds the augmentations)."""
        self.order.set_epoch(epoch)
        if self.supports is not None:
            self.supports.set_epoch(epoch)
        step = first_step
        support_batches = iter(self.supports) if self.supports is not None else None
        for unlabelled_ids in self.order:
            support_ids = next(support_batches) if support_batches is not None else None
            generator = step_generator(self.settings.run.seed, self.rank, step, self.device)
            ids = torch.as_tensor(unlabelled_ids, dtype=torch.long)
            if self.needs.labelled_sub_batch is not None and support_ids is not None:
                ids = torch.cat([ids, self.labelled[support_ids]])  # labelled images join the batch itself
                support_ids = None
            views: list[Tensor] = []
            if self.needs.unlabelled_views and self.needs.views is not None:
                views = self.augment.render(self._to_device(self.images[ids]), self.needs.views, generator)
            elif self.needs.unlabelled_views:
                views = self.augment(self._to_device(self.images[unlabelled_ids]), generator)
            supports: list[Tensor] = []
            classes = torch.empty(0, dtype=torch.long, device=self.device)
            if support_ids is not None:
                support_images = self._to_device(self.images[self.labelled[support_ids]])
                supports = self.augment.augment_views(
                    support_images, self.large, self.settings.augment.support_views, generator
                )
                classes = self._to_device(self.labelled_classes[support_ids])
            batch = Batch(views, supports, classes)
            if self.needs.labels_in_batch:
                batch.labels, batch.ids = self._to_device(self.batch_labels[ids]), self._to_device(ids)
                batch.true_labels = self._to_device(self.train_labels[ids])
            yield batch
            step += 1


def describe_dataset(dataset: ArrayDataset) -> str:
    train, test = len(dataset.train_labels), len(dataset.test_labels)
    return f"{dataset.name} at {Path(dataset.root)}: {train} train / {test} test images, {dataset.num_classes} classes"
