"""One interface to the training data, whatever its back end; `build_train_data` picks it by data.format.

- ``memory``: :class:`paws_cli.data.backends.memory.TrainData` (Fashion-MNIST, array datasets, CIFAR-10: uint8 arrays
  in RAM, augmented in batches on the training device);
- ``folder``: :class:`paws_cli.data.backends.folder.FolderTrainData` (an ImageFolder of image files decoded by PIL in DataLoader
  workers, the reference's per-image torchvision pipeline);
- ``ffcv``: ``paws_cli.data.backends.ffcv_loader.FFCVTrainData`` (a .beton decoded by FFCV; optional extra, imported only
  when asked for).

Every back end satisfies :class:`TrainDataLike`, which is all the training loop uses. Evaluation data (the
labelled bank and the test/val queries with the eval transform) comes from `build_eval_data`
(:mod:`paws_cli.data.backends.eval_data`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from paws_cli.config.schema import Settings
from paws_cli.data.backends.eval_data import EvalData, build_eval_data
from paws_cli.data.backends.memory import TrainData, labelled_indices, load_dataset
from paws_cli.data.needs import DataNeeds, needs_of
from paws_cli.data.sampling.batch import Batch
from paws_cli.data.sampling.samplers import SupportSampler, UnlabelledOrder

__all__ = ["EvalData", "TrainDataLike", "build_eval_data", "build_train_data"]


@runtime_checkable
class TrainDataLike(Protocol):
    """What the training loop needs from a data back end (one object per process).

    Attributes:
        order: the unlabelled batch order (its ``world_size`` is the run's).
        supports: the support sampler (``describe()`` is printed at start), or None when the method draws none.
        labelled: indices of the labelled subset in the train images (int64), stored in checkpoints.
        labelled_description: where the labelled subset came from, one line.
        name, num_classes, in_chans: the dataset's name, class count and image channels (for the model).
        skipped_images: unreadable images replaced so far (data.bad_images=skip); 0 for in-memory data.
        skipped_files: some of their paths (a bounded list, for the end-of-run report).
        device: the training device batches are delivered on.
    """

    device: torch.device
    order: UnlabelledOrder
    supports: SupportSampler | None
    labelled: Tensor
    labelled_description: str
    name: str
    num_classes: int
    in_chans: int
    skipped_images: int
    skipped_files: list[str]

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch and process."""
        ...

    def describe(self) -> str:
        """One line naming the dataset, where it is and its size."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The samplers' positions (the batches actually served), for checkpoints."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a state_dict: the next batches are the ones an uninterrupted run would see."""
        ...

    def epoch(self, epoch: int, first_step: int) -> Iterator[Batch]:
        """The remaining batches of ``epoch``; ``first_step`` is the global step of the first one (it seeds
        the augmentations)."""
        ...


def build_train_data(
    settings: Settings,
    needs: DataNeeds | None = None,
    *,
    device: torch.device,
    world_size: int = 1,
    rank: int = 0,
) -> TrainDataLike:
    """This process's training data for ``settings``, serving what the method ``needs`` (data.format chooses
    the back end, see the module doc)."""
    needs = needs_of(settings) if needs is None else needs
    fmt = settings.data.format
    if fmt == "memory":
        dataset = load_dataset(settings.data)
        labelled, description = labelled_indices(settings.data, dataset)
        return TrainData(
            settings,
            dataset,
            labelled,
            device=device,
            world_size=world_size,
            rank=rank,
            needs=needs,
            labelled_description=description,
        )
    if fmt == "folder":
        from paws_cli.data.backends.folder import FolderTrainData

        return FolderTrainData(settings, device=device, world_size=world_size, rank=rank, needs=needs)
    if fmt == "ffcv":
        # FFCV is an optional extra (compiled dependencies); only runs that ask for it import it.
        from paws_cli.data.backends.ffcv_loader import FFCVTrainData

        return FFCVTrainData(settings, device=device, world_size=world_size, rank=rank, needs=needs)
    raise ValueError(f"data.format={fmt!r} is not one of memory, folder, ffcv")
