"""The supervised-only baseline: same backbone and augmentations, cross-entropy on the labelled images only.

It trains on class-balanced batches of the labelled subset (the ``supervised:`` section gives their shape) with a
linear classifier on the backbone, so every accuracy the toolkit reports can stand beside what the labels alone
give.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paws_cli.config.schema import Settings, SupportBatchShape
from paws_cli.data.needs import DataNeeds
from paws_cli.data.sampling.batch import Batch
from paws_cli.method_registry import register_method
from paws_cli.methods.base import Method
from paws_cli.methods.paws import support_shape


class SupervisedSettings(SupportBatchShape):
    """The labelled batch of the baseline: K classes x P images per process (as PAWS's support batch)."""


class SupervisedModel(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.backbone.num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.encoder.backbone(images))


@register_method("supervised")
class SupervisedMethod(Method):
    settings_class = SupervisedSettings
    title = "supervised-only baseline"
    default_embedding = "backbone"  # it trains no projection head

    @classmethod
    def data_needs(cls, settings: Settings) -> DataNeeds:
        return DataNeeds(unlabelled_views=False, support=support_shape(settings, cls.name))

    def build_model(self) -> nn.Module:
        return SupervisedModel(self.build_encoder(projection=False, prediction=False), self.num_classes)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        images = torch.cat(batch.supports)
        targets = batch.support_classes.repeat(len(batch.supports))
        logits = model(images).float()
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
        return loss, {"loss": loss.detach(), "train_accuracy": accuracy.detach()}
