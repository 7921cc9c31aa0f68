"""PAWS (Assran et al., ICCV 2021): the model (backbone + projection + optional prediction head), its settings
section ``paws:`` and the step's loss (PAWS-SPEC.md section 1)."""

from __future__ import annotations

import math

from pydantic import Field
from torch import Tensor, nn

from paws_cli.config.schema import Settings, SupportBatchShape
from paws_cli.data.needs import DataNeeds, SupportShape
from paws_cli.data.sampling.batch import Batch
from paws_cli.losses import paws_health, paws_loss_terms, support_label_matrix
from paws_cli.method_registry import register_method
from paws_cli.methods.base import Method


class PAWSSettings(SupportBatchShape):
    """PAWS's loss and its labelled support batch (K classes x P images per process)."""

    tau: float = Field(0.1, gt=0, description="Soft nearest-neighbour temperature.")
    sharpen_T: float = Field(  # noqa: N815  (the paper calls it T; the loss argument is sharpen_T)
        0.25, gt=0, description="Target sharpening temperature T (0 < T; T < 1 sharpens)."
    )
    me_max: bool = Field(True, description="Add the mean-entropy maximisation regulariser.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Support label smoothing.")


def support_shape(settings: Settings, section: str) -> SupportShape:
    """The support batch declared by the method section ``section``."""
    cfg = settings.section(section)
    return SupportShape(cfg.classes_per_batch, cfg.images_per_class, cfg.unique_classes_per_rank, section)


class PAWSModel(nn.Module):
    """Holds the encoder; forward returns (h, z) for a list of views grouped by resolution."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.encoder(views)


@register_method("paws")
class PAWSMethod(Method):
    settings_class = PAWSSettings
    title = "PAWS"

    @classmethod
    def data_needs(cls, settings: Settings) -> DataNeeds:
        return DataNeeds(unlabelled_views=True, support=support_shape(settings, cls.name))

    def build_model(self) -> nn.Module:
        return PAWSModel(self.build_encoder())

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg: PAWSSettings = self.cfg
        multicrop = len(batch.views) - 2
        # supports first, then the 2 large views (same resolution: one BatchNorm group), then the small views
        h, z = model(batch.supports + batch.views)
        num_supports = sum(v.shape[0] for v in batch.supports)
        batch_size = batch.views[0].shape[0]
        classes = batch.support_classes.repeat(len(batch.supports))
        labels = support_label_matrix(classes, cfg.label_smoothing)
        terms = paws_loss_terms(
            anchor_views=z[num_supports:],
            anchor_supports=z[:num_supports],
            support_labels=labels,
            target_views=h[num_supports : num_supports + 2 * batch_size],
            target_supports=h[:num_supports],
            tau=cfg.tau,
            sharpen_T=cfg.sharpen_T,
            multicrop=multicrop,
            me_max=cfg.me_max,
        )
        loss = terms.ce + terms.me_max
        health = paws_health(terms, tau=cfg.tau, multicrop=multicrop)
        metrics = {
            "loss": loss.detach(),
            "ce": terms.ce.detach(),
            # me_max + log C = KL(pbar || uniform) >= 0: the same gradient, easier to read
            "me_max_kl": terms.me_max.detach() + math.log(labels.shape[1]) if cfg.me_max else terms.me_max,
            "target_confidence": health["target_confidence"],
            "support_accuracy": health["support_accuracy"],
        }
        return loss, metrics
