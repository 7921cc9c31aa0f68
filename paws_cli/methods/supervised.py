"""The supervised-only baseline: same backbone and augmentations, cross-entropy on the labelled images only.

It trains on the class-balanced support batches (the labelled subset) with a linear classifier on the backbone,
so every accuracy the toolkit reports can stand beside what the labels alone give.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paws_cli.data.pipeline import Batch
from paws_cli.methods.base import Method


class SupervisedModel(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.backbone.num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.encoder.backbone(images))


class SupervisedMethod(Method):
    name = "supervised"
    needs_unlabelled = False

    def build_model(self) -> nn.Module:
        return SupervisedModel(self.build_encoder(projection=False, prediction=False), self.num_classes)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        images = torch.cat(batch.supports)
        targets = batch.support_classes.repeat(len(batch.supports))
        logits = model(images).float()
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
        return loss, {"loss": loss.detach(), "train_accuracy": accuracy.detach()}
