"""PAWS: the model (backbone + projection + optional prediction head) and the step's loss."""

from __future__ import annotations

import math

from torch import Tensor, nn

from paws_cli.data.pipeline import Batch
from paws_cli.losses import paws_health, paws_loss_terms, support_label_matrix
from paws_cli.methods.base import Method


class PAWSModel(nn.Module):
    """Holds the encoder; forward returns (h, z) for a list of views grouped by resolution."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.encoder(views)


class PAWSMethod(Method):
    name = "paws"
    needs_unlabelled = True

    def build_model(self) -> nn.Module:
        return PAWSModel(self.build_encoder())

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.settings.loss
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
