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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from paws_cli import distributed as dist
from paws_cli.config import Settings
from paws_cli.data.arrays import ArrayDataset
from paws_cli.data.augment import MultiCropAugment, ViewSpec, eval_transform
from paws_cli.data.pipeline import step_generator
from paws_cli.data.splits import read_split

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


def make_finetune_splits(settings: Settings, dataset: ArrayDataset, labelled: np.ndarray) -> FinetuneSplits:
    """Split the labelled subset into training and held-out images (or read finetune.val_split)."""
    ft = settings.finetune
    labels = np.asarray(dataset.train_labels)
    labelled = np.asarray(labelled, dtype=np.int64)
    if ft.val_split is not None:
        split = read_split(ft.val_split, num_train=len(labels))
        if split.kind != "index":
            raise ValueError(
                f"finetune.val_split '{ft.val_split}' lists file names, but dataset '{dataset.name}' is indexed "
                "by position; use an index split (e.g. `paws make-splits --val-per-class`)"
            )
        heldout = np.sort(np.asarray(split.ids, dtype=np.int64))
        overlap = np.intersect1d(heldout, labelled)
        if overlap.size:
            raise ValueError(
                f"finetune.val_split '{ft.val_split}' shares {overlap.size} images with the labelled subset "
                f"(e.g. {overlap[:5].tolist()}); the held-out set must be disjoint from the training images"
            )
        return FinetuneSplits(
            np.sort(labelled), heldout, f"split file {ft.val_split} ({heldout.size} images)"
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
        f"{ft.val_per_class} labelled images per class held out (seed {settings.data.split_seed}): "
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
    model.eval()
    rank, world = dist.rank(), dist.world_size()
    counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, images
    mine = torch.arange(rank, len(labels), world)
    for start in range(0, len(mine), batch_size):
        ids = mine[start : start + batch_size]
        x = eval_transform(images[ids].to(device), mean, std, size=geometry.size, resize=geometry.resize)
        with autocast():
            logits = model(x)
        ranked = logits.float().topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        hits = ranked.eq(labels[ids].unsqueeze(1))
        counts += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), len(ids)])
    if dist.is_distributed():
        counts = counts.to(device)
        torch_dist.all_reduce(counts)
        counts = counts.cpu()
    total = max(counts[2].item(), 1.0)
    return {"top1": 100.0 * counts[0].item() / total, "top5": 100.0 * counts[1].item() / total}
