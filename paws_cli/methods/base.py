"""The seam between the shared machinery (data, models, optimiser, loop, checkpoints, evaluation) and a method.

A method is a ``Method`` subclass registered with ``@register_method("name")``. It declares:

- ``settings_class``: its own settings section (recipes hold it under the method's name, e.g. ``paws:``);
- ``data_needs``: what the back ends must serve (unlabelled multi-crop views, support batches, labels and ids of
  the batch's own images);
- ``build_model``: the module to train; the loop moves it to the device, wraps it (SyncBN, DDP) and optimises
  every parameter that requires a gradient;
- ``loss``: the loss on a batch and the scalars to log;
- ``after_step``: called after every optimiser step (an EMA target network goes here);
- ``state_dict``/``load_state_dict``: method state outside the model (queues) that checkpoints must carry for
  an exact resume;
- ``embedding_encoder`` and ``default_embedding``: which encoder and which of its outputs evaluation uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from paws_cli.config.schema import Section, Settings
from paws_cli.data.needs import DataNeeds
from paws_cli.data.sampling.batch import Batch
from paws_cli.models import PAWSEncoder, create_encoder


class Method(ABC):
    """One training method. Subclasses set ``settings_class`` and implement ``build_model`` and ``loss``."""

    name: ClassVar[str] = ""  # set by @register_method
    #: How run output names the method ("PAWS"); the registered name when empty.
    title: ClassVar[str] = ""
    settings_class: ClassVar[type[Section]] = Section
    #: The encoder output evaluation embeds with when eval.embedding=auto: 'auto' takes the prediction head when
    #: the encoder has one, else the projection.
    default_embedding: ClassVar[str] = "auto"

    def __init__(self, settings: Settings, *, in_chans: int, num_classes: int) -> None:
        self.settings = settings
        self.in_chans = in_chans
        self.num_classes = num_classes

    @property
    def cfg(self) -> Any:
        """This method's own settings section (``settings.<name>``)."""
        return self.settings.section(self.name)

    @classmethod
    @abstractmethod
    def data_needs(cls, settings: Settings) -> DataNeeds:
        """What the data back end must serve for ``settings`` (a classmethod: the data is built first)."""

    @classmethod
    def target_views(cls, settings: Settings) -> int:
        """How many of the batch's views (the first ones) also pass through a no-gradient target network
        (cost estimates count them as forward-only passes). Default: none."""
        return 0

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
        """The model to train. Its evaluated encoder is ``embedding_encoder(model)``; checkpoints store the
        encoder's weights under ``encoder.`` so that every evaluation command reads them alike."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss to minimise, detached scalar tensors to log) for one batch."""

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after each optimiser step, ``step`` counting from 1 (the steps done so far). Default: nothing."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Method state outside the model that a checkpoint must carry (tensors, numbers, strings)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; a method without state accepts only an empty one."""
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, but the checkpoint holds {sorted(state)}")

    def embedding_encoder(self, model: nn.Module) -> PAWSEncoder:
        """The encoder evaluation embeds with (unwrapping DDP and torch.compile)."""
        return encoder_of(model)


def encoder_of(model: nn.Module) -> PAWSEncoder:
    """The PAWSEncoder inside a trained model (unwrapping DDP)."""
    model = getattr(model, "module", model)
    return model.encoder if hasattr(model, "encoder") else model
