"""The network fine-tuned by `paws finetune`: backbone, kept projection layer, new zero-initialised classifier.

SimCLRv2 protocol (spec section 7): keep the backbone and the first projection layer (Linear + BN + ReLU), drop
the rest of the projection head and the prediction head, add a linear classifier initialised to zero. In
``linear`` mode the kept layers are frozen *and* stay in eval mode (BatchNorm uses and keeps its running
statistics), so the probe trains the classifier alone on fixed features.
"""

from __future__ import annotations

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
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Module | None, feature_dim: int, num_classes: int, frozen: bool
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
        self.frozen = frozen
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
        """The classifier's input for images ``x``."""
        return self.head(self.backbone(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for images ``x`` (N, C, H, W)."""
        return self.classifier(self.features(x))


def build_finetune_model(
    encoder: PAWSEncoder, num_classes: int, *, keep_projection_layers: int, mode: str
) -> FinetuneModel:
    """Keep ``encoder.backbone`` (+ ``encoder.projection.first`` when ``keep_projection_layers == 1``).

    The kept modules are shared with ``encoder`` (not copied: a ResNet-50x4 is 1.5 GB), whose other heads are
    simply not used.
    """
    if mode not in ("full", "linear"):
        raise ValueError(f"finetune.mode must be 'full' or 'linear', got {mode!r}")
    if keep_projection_layers not in (0, 1):
        raise ValueError(f"finetune.keep_projection_layers must be 0 or 1, got {keep_projection_layers!r}")
    head: nn.Module | None = None
    feature_dim = encoder.feature_dim
    if keep_projection_layers == 1:
        first = getattr(encoder.projection, "first", None)
        if first is None:
            raise ValueError(
                "the checkpoint's encoder has no projection head to keep a layer of (e.g. the supervised "
                "baseline); set finetune.keep_projection_layers=0"
            )
        head = first
        feature_dim = int(first.fc.out_features)
    return FinetuneModel(encoder.backbone, head, feature_dim, num_classes, frozen=mode == "linear")
