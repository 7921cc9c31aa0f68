"""Global batch and support sizes: the one place that turns per-process sizes into what a step sees.

Sizes in the settings are per process. The run banner, the SLURM submission, ``paws recipes ls`` and the
reproduction estimates all read the global numbers from :func:`global_sizes`, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from paws_cli.config.schema import Settings
from paws_cli.data.needs import SupportShape
from paws_cli.method_registry import method_class


@dataclass(frozen=True)
class GlobalSizes:
    """What one step sees on ``world`` processes (PAWS-SPEC section 2)."""

    world: int
    batch: int  # unlabelled images per step, all processes (0 when the method reads none)
    support: SupportShape | None  # the per-process support shape, None when the method draws none
    support_classes: int = 0  # distinct classes in the global support
    support_images: int = 0  # images per class in the global support
    support_views: int = 0  # augmented views per support image
    sub_batch: int = 0  # labelled images per step joining the batch itself (all processes)

    @property
    def support_total(self) -> int:
        """Support views per step, all processes."""
        return self.support_classes * self.support_images * self.support_views

    def support_line(self) -> str:
        """'global support: 10 classes x 8 images x 1 view(s) = 80 per step', or '' without a support."""
        if self.support is None:
            return ""
        return (
            f"global support: {self.support_classes} classes x {self.support_images} images x "
            f"{self.support_views} view(s) = {self.support_total} per step"
        )


def global_sizes(settings: Settings, world: int | None = None) -> GlobalSizes:
    """The global sizes of ``settings`` on ``world`` processes (default: the recipe's ``world_size``)."""
    world = settings.world_size if world is None else world
    needs = method_class(settings.method).data_needs(settings)
    batch = settings.optim.batch_size * world if needs.unlabelled_views or needs.labels_in_batch else 0
    if needs.labelled_sub_batch is not None:
        sub = needs.labelled_sub_batch
        return GlobalSizes(world, batch, None, sub_batch=sub.classes_per_batch * sub.images_per_class * world)
    if needs.support is None:
        return GlobalSizes(world, batch, None)
    classes, images = needs.support.global_classes_images(world)
    return GlobalSizes(world, batch, needs.support, classes, images, settings.augment.support_views)
