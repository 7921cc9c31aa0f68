"""The network fine-tuned by `paws finetune`: backbone, kept projection layers, new linear classifier.

SimCLRv2 protocol (spec section 7, the defaults): keep the backbone and the first projection layer (Linear + BN +
ReLU), drop the rest of the projection head and the prediction head, add a linear classifier initialised to zero.
In ``linear`` mode the kept layers are frozen *and* stay in eval mode (BatchNorm uses and keeps its running
statistics), so the probe trains the classifier alone on fixed features.

The small-data protocol of the Fashion-MNIST recipes instead keeps the layers up to the embedding PAWS-NN uses,
L2-normalises the classifier's input (``normalize``) and starts the classifier from the labelled images' class
prototypes (``prototype_weights``): before the first step the network is a nearest-prototype classifier over the
PAWS-NN embedding, which fine-tuning then improves, instead of starting from chance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paws_cli.models import PAWSEncoder


class FinetuneModel(nn.Module):
    """``classifier(head(backbone(x)))``; ``head`` is the kept projection layer or an identity.

    Args:
        backbone: the pretrained backbone (pooled features).
        head: the kept projection layer, or None to classify the backbone features.
        feature_dim: width of ``head(backbone(x))``.
        num_classes: classifier outputs.
        frozen: freeze backbone and head and keep them in eval mode (linear probe).
        normalize: L2-normalise ``head(backbone(x))`` before the classifier (a cosine classifier).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None,
        feature_dim: int,
        num_classes: int,
        frozen: bool,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()
        self.classifier = nn.Linear(feature_dim, num_classes)
        # SimCLRv2 starts the new classifier at zero: every class scores 0 and the first gradients come from
        # the pretrained features alone.
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.frozen, self.normalize = frozen, normalize
        if frozen:
            for module in (self.backbone, self.head):
                module.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> FinetuneModel:
        """Set train/eval mode; frozen layers always stay in eval mode."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
            self.head.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """The classifier's input for images ``x`` (unit vectors when ``normalize``)."""
        features = self.head(self.backbone(x))
        return F.normalize(features, dim=1) if self.normalize else features

    @torch.no_grad()
    def init_from_prototypes(self, features: Tensor, labels: Tensor, tau: float) -> None:
        """Classifier rows = ``prototype_weights(features, labels, tau)`` and zero biases, where ``features``
        are ``self.features`` of the training images (eval transform, eval mode)."""
        weight = prototype_weights(features, labels, self.classifier.out_features, tau)
        self.classifier.weight.copy_(weight.to(self.classifier.weight))
        self.classifier.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for images ``x`` (N, C, H, W)."""
        return self.classifier(self.features(x))


class KeptProjection(nn.Module):
    """The first ``k >= 2`` Linear layers of a ``ProjectionHead``, under the head's own names (``first``,
    ``middle``, and ``last`` when the whole head is kept), then optionally the encoder's prediction head (as
    ``prediction``), so a fine-tuning checkpoint's ``head.*`` keys map back to ``projection.*`` and
    ``prediction.*``. The modules are the encoder's (shared, not copied)."""

    def __init__(self, projection: nn.Module, k: int, prediction: nn.Module | None = None) -> None:
        super().__init__()
        self.first = projection.first
        self.middle = nn.Sequential(*list(projection.middle)[: k - 1])
        self.last = projection.last if k == projection.num_layers else None
        self.prediction = prediction
        self.out_dim = int(projection.out_dim if self.last is not None else projection.hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.middle(self.first(x))
        if self.last is not None:
            x = self.last(x)
        return self.prediction(x) if self.prediction is not None else x


def build_finetune_model(
    encoder: PAWSEncoder,
    num_classes: int,
    *,
    keep_projection_layers: int,
    mode: str,
    normalize: bool = False,
    keep_prediction_head: bool = False,
) -> FinetuneModel:
    """Keep ``encoder.backbone`` and the first ``keep_projection_layers`` Linear layers of its projection head.

    1 keeps ``encoder.projection.first`` (SimCLRv2); the head's layer count keeps the whole head, whose output
    is the embedding PAWS-NN uses when there is no prediction head. ``keep_prediction_head`` also keeps the
    prediction head on top of the whole projection head: the embedding nearest-neighbour evaluation uses when
    there is one (SemPPL's predictor). The kept modules are shared with ``encoder`` (not copied: a ResNet-50x4 is
    1.5 GB), whose other heads are simply not used.
    """
    if mode not in ("full", "linear"):
        raise ValueError(f"finetune.mode must be 'full' or 'linear', got {mode!r}")
    k = keep_projection_layers
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"finetune.keep_projection_layers must be 0 or more, got {k!r}")
    head: nn.Module | None = None
    feature_dim = encoder.feature_dim
    projection = encoder.projection
    layers = getattr(projection, "num_layers", 0) if hasattr(projection, "first") else 0
    # the predictor reads the whole projection head's output
    if keep_prediction_head and (k != layers or not layers or encoder.prediction is None):
        raise ValueError(
            "finetune.keep_prediction_head=true needs the whole projection head under it "
            f"(finetune.keep_projection_layers={layers}, got {k}) and a checkpoint with a prediction head "
            f"({'it has one' if encoder.prediction is not None else 'it has none'})"
        )
    if k >= 1:
        if not layers:
            raise ValueError(
                "the checkpoint's encoder has no projection head to keep a layer of (e.g. the supervised "
                "baseline); set finetune.keep_projection_layers=0"
            )
        if k > layers:
            raise ValueError(
                f"finetune.keep_projection_layers={k} but the projection head has {layers} Linear layers "
                f"(model.proj_layers); use 0 to {layers} ({layers} keeps the whole head)"
            )
        if k == 1 and not keep_prediction_head:
            head, feature_dim = projection.first, int(projection.first.fc.out_features)
        else:
            prediction = encoder.prediction if keep_prediction_head else None
            kept = KeptProjection(projection, k, prediction)
            head, feature_dim = kept, kept.out_dim
    return FinetuneModel(
        encoder.backbone, head, feature_dim, num_classes, frozen=mode == "linear", normalize=normalize
    )


def prototype_weights(features: Tensor, labels: Tensor, num_classes: int, tau: float) -> Tensor:
    """(num_classes, D) rows ``p_c / tau``: ``p_c`` is the unit-length mean of class c's unit-length features.

    On unit-length inputs ``q`` the logits ``q . p_c / tau`` are the cosine similarities to the class prototypes
    at PAWS-NN's temperature, so the softmax is a nearest-prototype classifier (PAWS-NN is a soft nearest
    neighbour over the same images). Computed in float64. Raises ValueError when a class has no image.
    """
    if tau <= 0:
        raise ValueError(f"the prototype temperature must be positive, got {tau}")
    labels = labels.long().cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes or not bool((counts > 0).all()):
        missing = [c for c in range(num_classes) if c >= len(counts) or counts[c] == 0]
        raise ValueError(
            f"classifier_init=prototypes needs a training image of every class of {num_classes}; classes "
            f"{missing or 'above the class count'} have none. Use finetune.classifier_init=zero or label them"
        )
    unit = F.normalize(features.detach().double().cpu(), dim=1)
    sums = torch.zeros(num_classes, unit.shape[1], dtype=torch.float64).index_add_(0, labels, unit)
    return F.normalize(sums, dim=1) / tau
