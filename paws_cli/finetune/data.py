"""Fine-tuning data: the train / held-out split of the labelled images, training batches and evaluation.

- Model selection uses a held-out set that is never the test set: ``finetune.val_split`` (ImageNet's
  ``val.txt``, disjoint from the labelled subsets) or, without it, ``finetune.val_per_class`` labelled images per
  class, drawn with a seed and removed from the training images.
- Training batches: a seeded permutation of the training images per epoch (the last batch of an epoch wraps
  around, so every batch has ``batch_size`` images per process), each image augmented with RandomResizedCrop
  (``finetune.crop_scale``) + horizontal flip at the training size, no colour operations. Batch and views are
  pure functions of (seed, step, rank): a resumed run sees exactly what an uninterrupted one would.
- Evaluation: ``eval_transform`` at the training size (``EvalGeometry``), top-1/top-5 counted per process and
  summed across processes.
- ImageFolder data (data.format=folder) is read through ``paws_cli.data.backends.eval_data.FolderEvalData``: training
  views are rendered by PIL in DataLoader workers (``FolderFinetuneBatches``, the same images per step and the
  same per-view seeding as pretraining's folder data), evaluation uses the folder evaluation transform, and
  ``finetune.val_split`` lists file names (ImageNet's official ``val.txt``: ``official:val``).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from paws_cli import collectives as dist
from paws_cli.config import Settings
from paws_cli.data.augment.views import MultiCropAugment, ViewSpec, eval_transform
from paws_cli.data.backends.eval_data import EvalData, FolderEvalData, MemoryEvalData
from paws_cli.data.backends.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    UNLABELLED,
    FolderIndex,
    FolderViews,
    Key,
    check_failures,
    collate_batch,
    collect_before_fork,
    worker_init,
)
from paws_cli.data.backends.memory import as_nchw
from paws_cli.data.datasets.arrays import ArrayDataset
from paws_cli.data.sampling.batch import step_generator
from paws_cli.data.splits.files import read_split, resolve_names
from paws_cli.finetune.model import FinetuneModel

#: Salt of the held-out draw, so it differs from the labelled-subset draw made with the same data.split_seed.
_HELDOUT_SALT = 0x7E1D
#: Centre-crop fraction when the training size differs from the images' (the ImageNet 224/256 convention).
CROP_FRACTION = 0.875


@dataclass(frozen=True)
class FinetuneSplits:
    """Indices into the dataset's *train* split: what fine-tuning trains on and what selects the epoch."""

    train: np.ndarray
    heldout: np.ndarray
    description: str


def _heldout_ids(path: str, dataset: ArrayDataset | EvalData, num_train: int) -> np.ndarray:
    """Train-image indices a held-out split file lists: file names for an ImageFolder, indices otherwise."""
    if isinstance(dataset, FolderEvalData):
        split = read_split(path)
        if split.kind != "name":
            raise ValueError(
                f"finetune.val_split '{path}' lists integer indices, but ImageFolder data is matched by file name; "
                "use a file-name split (ImageNet's official held-out list: finetune.val_split=official:val)"
            )
        return resolve_names(
            split,
            dataset.train.files,
            dataset=f"the image folder {dataset.train.root}",
            what=f"finetune.val_split {path}",
        )
    split = read_split(path, num_train=num_train)
    if split.kind != "index":
        raise ValueError(
            f"finetune.val_split '{path}' lists file names, but dataset '{dataset.name}' is indexed "
            "by position; use an index split (e.g. `paws make-splits --val-per-class`)"
        )
    return np.asarray(split.ids, dtype=np.int64)


def make_finetune_splits(
    settings: Settings, dataset: ArrayDataset | EvalData, labelled: np.ndarray
) -> FinetuneSplits:
    """Split the labelled subset into training and held-out images (or read finetune.val_split)."""
    ft = settings.finetune
    labels = np.asarray(dataset.train_labels)
    labelled = np.asarray(labelled, dtype=np.int64)
    if ft.val_split is not None:
        heldout = np.sort(_heldout_ids(ft.val_split, dataset, len(labels)))
        overlap = np.intersect1d(heldout, labelled)
        if overlap.size:
            raise ValueError(
                f"finetune.val_split '{ft.val_split}' shares {overlap.size} images with the labelled subset "
                f"(e.g. {overlap[:5].tolist()}); the held-out set must be disjoint from the training images"
            )
        return FinetuneSplits(
            np.sort(labelled), heldout, f"split file {ft.val_split} ({heldout.size} images)"
        )
    if ft.val_per_class == 0:
        if ft.select != "last":
            raise ValueError(
                f"finetune.val_per_class=0 holds no image out, but finetune.select={ft.select} selects the epoch "
                "on held-out images; set finetune.select=last (a fixed finetune.epochs), hold images out "
                "(finetune.val_per_class >= 1) or give finetune.val_split"
            )
        train = np.sort(labelled)
        return FinetuneSplits(
            train,
            train[:0],
            f"none held out: all {train.size} labelled images train, the last epoch is tested",
        )
    rng = np.random.default_rng([settings.data.split_seed, _HELDOUT_SALT])
    held: list[np.ndarray] = []
    problems = []
    for cls in np.unique(labels[labelled]):
        members = np.sort(labelled[labels[labelled] == cls])
        if members.size <= ft.val_per_class:
            problems.append(f"class {cls} has {members.size}")
            continue
        held.append(rng.choice(members, size=ft.val_per_class, replace=False))
    if problems:
        raise ValueError(
            f"finetune.val_per_class={ft.val_per_class} would leave no training image: {'; '.join(problems)} "
            "labelled image(s). Lower finetune.val_per_class, label more images, or give finetune.val_split"
        )
    heldout = np.sort(np.concatenate(held))
    train = np.setdiff1d(labelled, heldout)
    description = (
        f"{ft.val_per_class} labelled image{'s' if ft.val_per_class != 1 else ''} per class held out (seed {settings.data.split_seed}): "
        f"{heldout.size} held-out, {train.size} for training"
    )
    return FinetuneSplits(train, heldout, description)


@dataclass(frozen=True)
class EvalGeometry:
    """How evaluation images are resized/cropped (None: used as they are), see ``eval_transform``."""

    size: int | None = None
    resize: int | None = None

    @staticmethod
    def for_images(image_side: int, train_size: int) -> EvalGeometry:
        """As is when images already have the training size; else resize to train/0.875 and centre-crop."""
        if image_side == train_size:
            return EvalGeometry()
        return EvalGeometry(size=train_size, resize=round(train_size / CROP_FRACTION))


class FinetuneBatches:
    """Augmented training batches of one process, addressed by the global step."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        train: np.ndarray,
        *,
        batch_size: int,
        spec: ViewSpec,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int,
        device: torch.device,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if len(train) == 0:
            raise ValueError("fine-tuning needs at least one training image")
        self.images, self.labels = images, labels
        self.train = torch.as_tensor(train, dtype=torch.long)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.spec, self.seed, self.device = spec, seed, device
        self.augment = MultiCropAugment(large=spec, small=None, num_large=1, mean=mean, std=std)
        self._epoch, self._perm = -1, self.train

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(math.ceil(len(self.train) / self.global_batch), 1)

    def permutation(self, epoch: int) -> Tensor:
        """The training images in the order of ``epoch`` (the same on every process)."""
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch, 0xF17E]).permutation(len(self.train))
            self._epoch, self._perm = epoch, self.train[torch.as_tensor(order)]
        return self._perm

    def indices(self, step: int) -> Tensor:
        """Train-split indices of this process's batch at global ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        start = position * self.global_batch + self.rank * self.batch_size
        return perm[torch.arange(start, start + self.batch_size) % len(perm)]

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(augmented images, class labels) of this process at global ``step``, on the device."""
        ids = self.indices(step)
        generator = step_generator(self.seed, self.rank, step, self.device)
        images = self.images[ids].to(self.device, non_blocking=True)
        view = self.augment.augment_views(images, self.spec, 1, generator)[0]
        return view, self.labels[ids].to(self.device, non_blocking=True)


def finetune_view_spec(settings: Settings) -> ViewSpec:
    """RandomResizedCrop(finetune.crop_scale) + flip at the training size; no colour, blur or grey operations."""
    return ViewSpec(
        size=settings.augment.large_size,
        scale=tuple(settings.finetune.crop_scale),
        flip_p=0.5,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
        equalize_p=0.0,
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    geometry: EvalGeometry,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[object]],
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) of ``model`` (put in eval mode here) on uint8 ``images`` (N, C, H, W).

    Each process scores its own shard (every world_size-th image) and the counts are summed.
    """
    rank, world = dist.rank(), dist.world_size()
    mine = torch.arange(rank, len(labels), world)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(mine), batch_size):
            ids = mine[start : start + batch_size]
            x = eval_transform(images[ids].to(device), mean, std, size=geometry.size, resize=geometry.resize)
            yield x, labels[ids]

    return evaluate_batches(model, batches(), device=device, autocast=autocast)


@torch.inference_mode()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[object]],
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy (``loss``, for finetune.select=loss) over this process's
    (images, labels) batches, sums taken over processes."""
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64)  # top-1 hits, top-5 hits, images, summed cross-entropy
    for x, y in batches:
        with autocast():
            logits = model(x.to(device, non_blocking=True))
        logits = logits.float().cpu()
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = ranked.eq(y.unsqueeze(1))
        loss = F.cross_entropy(logits.double(), y, reduction="sum").item()
        counts += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), len(y), loss])
    if dist.is_distributed():
        counts = counts.to(device)
        torch_dist.all_reduce(counts)
        counts = counts.cpu()
    total = max(counts[2].item(), 1.0)
    return {
        "top1": 100.0 * counts[0].item() / total,
        "top5": 100.0 * counts[1].item() / total,
        "loss": counts[3].item() / total,
    }


class _FinetuneKeys:
    """Batch sampler of ``FolderFinetuneBatches``: the keys of every step from ``start`` on (held weakly)."""

    def __init__(self, owner: FolderFinetuneBatches) -> None:
        self._owner = weakref.ref(owner)

    def __iter__(self) -> Iterator[list[Key]]:
        owner = self._owner()
        start = owner._start if owner is not None else 0
        del owner  # the generator holds only the weak reference: the DataLoader keeps it between batches
        for step in itertools.count(start):
            owner = self._owner()
            if owner is None:
                return
            keys = [Key(UNLABELLED, step, i, int(j)) for i, j in enumerate(owner.indices(step).tolist())]
            del owner
            yield keys


class FolderFinetuneBatches(FinetuneBatches):
    """``FinetuneBatches`` of an ImageFolder: the same images per step, views rendered by PIL in DataLoader
    workers with per-view seeds (so they do not depend on the worker count or on resuming)."""

    def __init__(
        self,
        index: FolderIndex,
        train: np.ndarray,
        *,
        batch_size: int,
        spec: ViewSpec,
        seed: int,
        device: torch.device,
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        bad_images: str = "skip",
    ) -> None:
        labels = torch.as_tensor(index.labels, dtype=torch.long)
        empty = torch.empty(0, 3, 1, 1, dtype=torch.uint8)  # images are read from the folder, not held
        super().__init__(
            empty,
            labels,
            train,
            batch_size=batch_size,
            spec=spec,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            seed=seed,
            device=device,
            world_size=world_size,
            rank=rank,
        )
        self.index, self.num_workers, self.bad_images = index, num_workers, bad_images
        self.views = FolderViews(index, [spec], [], seed, rank)
        self.mean_t = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.skipped_images = 0
        self._start, self._next = 0, -1
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._loader: DataLoader | None = None

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(normalised views, labels) of this process at global ``step``, on the device."""
        if self._iterator is None or step != self._next:
            if self._loader is None:
                collect_before_fork()
                self._loader = DataLoader(
                    self.views,
                    batch_sampler=_FinetuneKeys(self),
                    num_workers=self.num_workers,
                    collate_fn=collate_batch,
                    pin_memory=self.device.type == "cuda",
                    persistent_workers=self.num_workers > 0,
                    worker_init_fn=worker_init if self.num_workers > 0 else None,
                )
            self._start = step
            self._iterator = iter(self._loader)
        raw = next(self._iterator)
        self._next = step + 1
        self.skipped_images += len(check_failures(raw, self.bad_images, self.index.root))
        x = raw["unlabelled_views"][0].to(self.device, non_blocking=True).float().div_(255.0)
        y = raw["unlabelled_classes"].to(self.device, non_blocking=True)
        return (x - self.mean_t) * self.inv_std, y


class FinetuneData:
    """What fine-tuning reads, for in-memory and ImageFolder data: training batches and scores."""

    def __init__(
        self,
        settings: Settings,
        data: EvalData,
        train: np.ndarray,
        *,
        device: torch.device,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        ft, run = settings.finetune, settings.run
        self.data, self.device, self.batch_size = data, device, settings.eval.batch_size
        self.rank, self.world_size = rank, world_size
        common = {
            "batch_size": ft.batch_size,
            "spec": finetune_view_spec(settings),
            "seed": run.seed,
            "device": device,
            "world_size": world_size,
            "rank": rank,
        }
        self.batches: FinetuneBatches
        if isinstance(data, MemoryEvalData):
            ds = data.dataset
            self.images = as_nchw(ds.train_images)
            self.labels = torch.as_tensor(np.asarray(ds.train_labels), dtype=torch.long)
            self.mean, self.std = tuple(ds.mean), tuple(ds.std)
            self.batches = FinetuneBatches(
                self.images, self.labels, train, mean=self.mean, std=self.std, **common
            )
            self.geometry = EvalGeometry.for_images(int(self.images.shape[-1]), settings.augment.large_size)
        elif isinstance(data, FolderEvalData):
            self.batches = FolderFinetuneBatches(
                data.train,
                train,
                num_workers=settings.data.num_workers,
                bad_images=settings.data.bad_images,
                **common,
            )
        else:
            raise ValueError(f"fine-tuning cannot read {type(data).__name__} data")

    @torch.inference_mode()
    def features(
        self, model: FinetuneModel, ids: np.ndarray, autocast: Callable[[], AbstractContextManager[object]]
    ) -> tuple[Tensor, Tensor]:
        """(``model.features``, labels) of the train images ``ids``: evaluation transform, eval mode, float32
        on the CPU, every image on every process (classifier_init=prototypes)."""
        model.eval()
        if isinstance(self.data, MemoryEvalData):
            chosen = torch.as_tensor(np.asarray(ids, dtype=np.int64))
            batches: Iterable[tuple[Tensor, Tensor]] = (
                (
                    eval_transform(
                        self.images[part].to(self.device), self.mean, self.std,
                        size=self.geometry.size, resize=self.geometry.resize,
                    ),
                    self.labels[part],
                )
                for part in chosen.split(self.batch_size)
            )  # fmt: skip
        else:
            batches = self.data.train_batches(np.asarray(ids), self.batch_size)
        features, labels = [], []
        for x, y in batches:
            with autocast():
                features.append(model.features(x.to(self.device, non_blocking=True)).float().cpu())
            labels.append(y.cpu())
        return torch.cat(features), torch.cat(labels)

    def score(
        self, model: nn.Module, ids: np.ndarray | None, autocast: Callable[[], AbstractContextManager[object]]
    ) -> dict[str, float]:
        """Top-1/top-5 on the train images ``ids`` (held-out selection) or, with None, the test/val images."""
        if isinstance(self.data, MemoryEvalData):
            ds = self.data.dataset
            source = (as_nchw(ds.test_images), torch.as_tensor(np.asarray(ds.test_labels)))
            if ids is not None:
                source = (self.images[torch.as_tensor(ids)], self.labels[torch.as_tensor(ids)])
            return evaluate(
                model,
                *source,
                mean=self.mean,
                std=self.std,
                geometry=self.geometry,
                batch_size=self.batch_size,
                device=self.device,
                autocast=autocast,
            )
        if ids is None:
            batches = self.data.query_batches(self.batch_size, rank=self.rank, world_size=self.world_size)
        else:
            batches = self.data.train_batches(np.asarray(ids)[self.rank :: self.world_size], self.batch_size)
        return evaluate_batches(model, batches, device=self.device, autocast=autocast)
