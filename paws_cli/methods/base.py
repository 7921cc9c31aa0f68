"""The interface between the shared training loop and a method."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from paws_cli.config.schema import Settings
from paws_cli.data.pipeline import Batch
from paws_cli.models import PAWSEncoder, create_encoder


class Method(ABC):
    """A method builds its model and turns a batch into a loss plus metrics to log.

    `needs_unlabelled` tells the data pipeline whether to produce unlabelled views at all.
    """

    name: str = ""
    needs_unlabelled: bool = True

    def __init__(self, settings: Settings, *, in_chans: int, num_classes: int) -> None:
        self.settings = settings
        self.in_chans = in_chans
        self.num_classes = num_classes

    def build_encoder(self, *, projection: bool = True, prediction: bool = True) -> PAWSEncoder:
        m = self.settings.model
        return create_encoder(
            m.backbone,
            in_chans=self.in_chans,
            proj_hidden_dim=m.proj_hidden_dim,
            proj_out_dim=m.proj_out_dim,
            proj_layers=m.proj_layers if projection else 0,
            pred_hidden_dim=m.pred_hidden_dim if prediction else None,
        )

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model to train; it exposes `.encoder` (a PAWSEncoder) for evaluation."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss to minimise, scalar tensors to log). Logged tensors are detached."""

    def epoch_metrics(self, sums: dict[str, float], count: int) -> dict[str, float]:
        """Per-epoch averages of the logged values."""
        return {k: v / max(count, 1) for k, v in sums.items()}


def encoder_of(model: nn.Module) -> PAWSEncoder:
    """The PAWSEncoder inside a trained model (unwrapping DDP)."""
    model = getattr(model, "module", model)
    return model.encoder if hasattr(model, "encoder") else model


def detach_metrics(values: dict[str, Tensor | float]) -> dict[str, Tensor]:
    return {k: (v.detach() if isinstance(v, Tensor) else torch.tensor(float(v))) for k, v in values.items()}
