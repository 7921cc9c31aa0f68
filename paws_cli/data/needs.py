"""What a method asks of the data back ends: the values they need, not the whole settings tree.

A method declares a :class:`DataNeeds` (``Method.data_needs``); ``build_train_data`` hands it to the back end,
which then serves exactly that: multi-crop views of the unlabelled batch, class-stratified support batches, and/or
the labels (-1 for unlabelled images) and global ids of the batch's own images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paws_cli.data.augment.views import ViewSpec
from paws_cli.method_registry import method_class


@dataclass(frozen=True)
class SupportShape:
    """A class-stratified labelled batch of ``classes_per_batch`` x ``images_per_class`` images per process.

    ``section`` is the settings section the numbers came from (error messages name ``section.key``)."""

    classes_per_batch: int
    images_per_class: int
    unique_classes_per_rank: bool
    section: str

    def global_classes_images(self, world: int) -> tuple[int, int]:
        """(classes, images per class) of the global support on ``world`` processes (PAWS-SPEC section 2):
        unique classes per rank multiply the classes, shared classes multiply the images per class."""
        if self.unique_classes_per_rank:
            return self.classes_per_batch * world, self.images_per_class
        return self.classes_per_batch, self.images_per_class * world


@dataclass(frozen=True)
class DataNeeds:
    """The inputs a method's step reads from a :class:`~paws_cli.data.sampling.batch.Batch`.

    unlabelled_views: multi-crop views of the unlabelled batch (``Batch.views``).
    views: the augmentation of each of those views, in order; None: 2 large views and augment.num_small small
        views as the ``augment`` settings describe them (PAWS's multi-crop).
    support: the shape of the class-stratified support batch (``Batch.supports``), or None for none.
    labels_in_batch: ``Batch.labels`` (the label of each image of the unlabelled batch when it is in the labelled
        subset, else -1), ``Batch.ids`` (its global index in the train set) and ``Batch.true_labels`` (every
        image's label, for health signals only). Labelled images then flow through the batch at their natural
        rate.
    labelled_sub_batch: a class-stratified labelled batch of this shape appended to the batch (its images carry
        their labels), so that every step sees labelled images; None for the natural rate only.
    """

    unlabelled_views: bool = True
    views: tuple[ViewSpec, ...] | None = None
    support: SupportShape | None = None
    labels_in_batch: bool = False
    labelled_sub_batch: SupportShape | None = None

    def __post_init__(self) -> None:
        if self.support is not None and self.labelled_sub_batch is not None:
            raise ValueError("a method asks for either a support batch or a labelled sub-batch, not both")
        if self.labelled_sub_batch is not None and not self.labels_in_batch:
            raise ValueError("a labelled sub-batch is part of the batch: it needs labels_in_batch=True")


def require_servable(needs: DataNeeds, fmt: str) -> None:
    """Refuse what the folder and ffcv back ends cannot serve: labels of the batch's images without their views
    (those back ends choose the batch's images through the views they render), or nothing at all."""
    if needs.labels_in_batch and not needs.unlabelled_views:
        raise ValueError(
            f"data.format={fmt} serves the labels and ids of a batch's images together with their views; this "
            "method asks for the labels without the views, which only data.format=memory serves"
        )
    if not needs.unlabelled_views and needs.support is None:
        raise ValueError(
            f"data.format={fmt}: this method asks for neither views nor a support batch, so there is nothing to "
            "serve"
        )


def needs_of(settings: Any) -> DataNeeds:
    """What ``settings.method`` declares (the default of every back end, so that tools and tests that build data
    for a recipe get what its method trains on)."""
    return method_class(settings.method).data_needs(settings)
