"""The PAWS encoder: a timm backbone followed by the projection and (optional) prediction heads.

``PAWSEncoder.forward`` takes the list of view tensors of one training step and runs the network once per
*resolution group* (consecutive views of the same size are concatenated), so BatchNorm normalises e.g.
supports + the two large views together and the small views together, as the reference does (spec
section 1). ``h`` (projection output) gives the targets, ``z`` (prediction output, or ``h`` without a
prediction head) the anchors.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

from paws_cli.models.heads import PredictionHead, ProjectionHead

__all__ = ["PAWSEncoder", "backbone_output_dim", "create_encoder", "group_views"]

EmbedWhich = Literal["backbone", "projection", "prediction"]
_EMBED_CHOICES = ("backbone", "projection", "prediction")

#: Backbones this package registers with timm (listed in error messages).
PAWS_BACKBONES = ("resnet50x1", "resnet50x2", "resnet50x4", "wrn28_2", "cnn_w16", "cnn_w32")


def backbone_output_dim(backbone: nn.Module) -> int:
    """Width of ``backbone(x)`` for a timm model built with ``num_classes=0``.

    timm models whose pooled output passes a pre-logits layer report it as ``head_hidden_size``; the others
    only have ``num_features``.
    """
    dim = getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features", None)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(
            f"cannot tell the output width of backbone {type(backbone).__name__}: it has neither "
            "'head_hidden_size' nor 'num_features'; use a timm model"
        )
    return dim


def group_views(views: Sequence[Tensor]) -> list[list[Tensor]]:
    """Split ``views`` into runs of consecutive tensors with the same per-sample shape (C, H, W)."""
    if isinstance(views, Tensor) or len(views) == 0:
        raise ValueError("PAWSEncoder.forward expects a non-empty list of (N, C, H, W) view tensors")
    groups: list[list[Tensor]] = []
    for i, view in enumerate(views):
        if not isinstance(view, Tensor) or view.ndim != 4:
            shape = tuple(view.shape) if isinstance(view, Tensor) else type(view).__name__
            raise ValueError(f"view {i} must be an (N, C, H, W) tensor, got {shape}")
        if groups and groups[-1][0].shape[1:] == view.shape[1:]:
            groups[-1].append(view)
        else:
            groups.append([view])
    return groups


class PAWSEncoder(nn.Module):
    """Backbone + projection head + optional prediction head.

    Args:
        backbone: a timm model created with ``num_classes=0`` (``backbone(x)`` gives pooled features).
        projection: the projection head; ``None`` (or ``nn.Identity``) means ``h`` is the backbone output.
        prediction: the prediction head; ``None`` means ``z = h``.

    Attributes:
        feature_dim: width of the backbone output.
        out_dim: width of ``h`` and ``z``.
    """

    def __init__(
        self, backbone: nn.Module, projection: nn.Module | None = None, prediction: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = projection if projection is not None else nn.Identity()
        self.prediction = prediction
        self.feature_dim = backbone_output_dim(backbone)
        self.out_dim = getattr(self.projection, "out_dim", self.feature_dim)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.projection(self.backbone(x))
        z = h if self.prediction is None else self.prediction(h)
        return h, z

    def forward(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(h, z) for all views, concatenated along the batch dimension in the given order.

        The network runs once per group of consecutive same-sized views; the grouping decides which samples
        share BatchNorm batch statistics in training mode.
        """
        hs: list[Tensor] = []
        zs: list[Tensor] = []
        for group in group_views(views):
            # A single-tensor group is passed as is: no concatenation copy.
            x = group[0] if len(group) == 1 else torch.cat(group, dim=0)
            h, z = self._heads(x)
            hs.append(h)
            zs.append(z)
        if len(hs) == 1:
            return hs[0], zs[0]
        h = torch.cat(hs, dim=0)
        # Without a prediction head z is h: return the same tensor instead of concatenating twice.
        return h, (h if self.prediction is None else torch.cat(zs, dim=0))

    def embed(self, x: Tensor, which: EmbedWhich = "prediction") -> Tensor:
        """Embeddings of one batch for evaluation (call under ``torch.no_grad()`` and ``.eval()``).

        ``which``: ``"backbone"`` (pooled backbone features), ``"projection"`` (``h``) or ``"prediction"``
        (``z``, the anchor representation; equal to ``h`` when the encoder has no prediction head, as in
        ``forward``).
        """
        if which not in _EMBED_CHOICES:
            raise ValueError(f"embed: which must be one of {list(_EMBED_CHOICES)}, got {which!r}")
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"embed expects an (N, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
        feats = self.backbone(x)
        if which == "backbone":
            return feats
        h = self.projection(feats)
        if which == "projection" or self.prediction is None:
            return h
        return self.prediction(h)


def _unknown_backbone_message(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.5)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    return (
        f"unknown backbone {name!r}.{hint} Backbones added by paws: {', '.join(PAWS_BACKBONES)}; "
        "every other name in timm.list_models() works as well."
    )


def create_encoder(
    backbone: str,
    in_chans: int,
    proj_hidden_dim: int | None,
    proj_out_dim: int,
    proj_layers: int,
    pred_hidden_dim: int | None,
    backbone_kwargs: dict[str, Any] | None = None,
) -> PAWSEncoder:
    """Build a randomly initialised PAWSEncoder.

    Args:
        backbone: timm model name (including this package's ``resnet50x*``, ``wrn28_2``, ``cnn_w*``).
        in_chans: image channels (1 for grey, 3 for RGB).
        proj_hidden_dim: hidden width of the projection head; ``None`` means the backbone output width.
        proj_out_dim: output width D of the projection head (unused when ``proj_layers == 0``).
        proj_layers: Linear layers in the projection head (>= 2); 0 means no projection head (h = features).
        pred_hidden_dim: hidden width of the prediction head; ``None`` means no prediction head (z = h).
        backbone_kwargs: extra arguments for ``timm.create_model`` (e.g. ``drop_path_rate``).
    """
    # This package's backbones are registered by paws_cli/models/__init__.py, which Python runs before this
    # module whatever the import path.
    if not isinstance(backbone, str) or not timm.is_model(backbone):
        raise ValueError(_unknown_backbone_message(str(backbone)))
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive integer (1 for grey, 3 for RGB), got {in_chans!r}")
    if not isinstance(proj_layers, int) or proj_layers < 0 or proj_layers == 1:
        raise ValueError(
            f"proj_layers must be 0 (no projection head) or an integer >= 2, got {proj_layers!r}"
        )
    kwargs = dict(backbone_kwargs or {})
    for key in ("num_classes", "in_chans", "pretrained"):
        if key in kwargs:
            raise ValueError(f"backbone_kwargs must not set {key!r}: create_encoder sets it")
    net = timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    feature_dim = backbone_output_dim(net)

    projection: nn.Module | None = None
    if proj_layers > 0:
        hidden = feature_dim if proj_hidden_dim is None else proj_hidden_dim
        projection = ProjectionHead(feature_dim, hidden, proj_out_dim, num_layers=proj_layers)
    out_dim = proj_out_dim if projection is not None else feature_dim
    prediction = None if pred_hidden_dim is None else PredictionHead(out_dim, pred_hidden_dim)
    return PAWSEncoder(net, projection, prediction)
