"""Small-image backbones (28-32 px inputs) registered with timm: ``wrn28_2``, ``cnn_w16``, ``cnn_w32``.

- ``wrn28_2``: the pre-activation Wide-ResNet-28-2 that PAWS uses on CIFAR-10 (spec section 4); neither timm
  nor torchvision provides it. 128-d output, 1,466,320 parameters without a classifier.
- ``cnn_w16`` / ``cnn_w32``: a deliberately tiny ResNet-like net (one residual block per stage) for quick CPU
  demos and tests; 4w-d output.

Both follow timm's model interface (``num_features``, ``forward_features``, ``forward_head``,
``reset_classifier``), accept ``in_chans`` (1 for grey images) and ``num_classes`` (0 = pooled features only).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from paws_cli.models.wide_resnet import attach_pretrained_cfg, strip_entrypoint_kwargs

__all__ = ["SmallResNet", "cnn_w16", "cnn_w32", "wrn28_2"]

_SMALL_NAMES = ("wrn28_2", "cnn_w16", "cnn_w32")

# Metadata only (no weights): CIFAR-sized inputs; normalisation is the data pipeline's business.
default_cfgs = generate_default_cfgs(
    {
        name: {
            "url": "",
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "pool_size": (8, 8),
            "crop_pct": 1.0,
            "first_conv": "stem",
            "classifier": "fc",
        }
        for name in _SMALL_NAMES
    }
)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the (projected) input.

    When the shape changes, the 1x1 shortcut projection reads the *activated* input, as in the
    identity-mapping ResNet and the original Wide-ResNet, so every convolution's input goes through BN-ReLU.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_ch, out_ch)
        needs_proj = stride != 1 or in_ch != out_ch
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if needs_proj else None

    def forward(self, x: Tensor) -> Tensor:
        """Residual update of ``x``."""
        out = self.act1(self.bn1(x))
        # Identity shortcut keeps the raw input (the pre-activation design); the projection uses `out`.
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + skip


class BasicBlock(nn.Module):
    """Post-activation basic block (original ResNet): conv-BN-ReLU-conv-BN, add shortcut, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act2 = nn.ReLU(inplace=True)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Residual update of ``x``."""
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, three stages (strides 1, 2, 2), optional final BN-ReLU, average pool.

    Args:
        block: ``"preact"`` (Wide-ResNet style, ends with BN-ReLU) or ``"basic"`` (post-activation).
        stem_width: output channels of the 3x3 stem convolution.
        widths: output channels of the three stages.
        depth_per_stage: residual blocks per stage.
        in_chans: input channels (1 for grey images, 3 for colour).
        num_classes: size of the linear classifier; 0 means ``forward`` returns the pooled features.
        drop_rate: dropout before the classifier (only used when ``num_classes > 0``).
    """

    def __init__(
        self,
        block: str,
        stem_width: int,
        widths: tuple[int, int, int],
        depth_per_stage: int,
        in_chans: int = 3,
        num_classes: int = 0,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if block not in ("preact", "basic"):
            raise ValueError(f"block must be 'preact' or 'basic', got {block!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer (1 for grey, 3 for RGB), got {in_chans!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = features only), got {num_classes!r}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        block_cls = PreActBlock if block == "preact" else BasicBlock

        self.stem = _conv3x3(in_chans, stem_width)
        # The pre-activation net normalises at the end of the network instead of after the stem.
        if block == "preact":
            self.stem_norm: nn.Module = nn.Identity()
        else:
            self.stem_norm = nn.Sequential(nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))

        stages = []
        in_ch = stem_width
        for stage_idx, width in enumerate(widths):
            stride = 1 if stage_idx == 0 else 2
            blocks = [
                block_cls(in_ch if i == 0 else width, width, stride if i == 0 else 1)
                for i in range(depth_per_stage)
            ]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        if block == "preact":
            self.final_norm: nn.Module = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True))
        else:
            self.final_norm = nn.Identity()

        self.num_features = in_ch
        self.head_hidden_size = in_ch
        self.head_drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # He init for ReLU nets (fan_out, as timm's ResNet does); BatchNorm keeps its default (1, 0).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        """The classifier module (``nn.Identity`` when ``num_classes == 0``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh ``Linear(num_features, num_classes)`` (0 removes it)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"{type(self).__name__} only supports global_pool='avg', got {global_pool!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        device = next(self.parameters()).device
        self.fc = (
            nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        )

    def forward_features(self, x: Tensor) -> Tensor:
        """Unpooled feature map (N, num_features, H', W'), like timm's ``forward_features``."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected input of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}; "
                "set in_chans to the number of image channels (1 for grey, 3 for RGB)"
            )
        x = self.stem_norm(self.stem(x))
        return self.final_norm(self.stages(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool, then (unless ``pre_logits``) dropout and the classifier."""
        x = torch.mean(x, dim=(2, 3))
        if pre_logits:
            return x
        return self.fc(self.head_drop(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits, or pooled (N, num_features) features when ``num_classes == 0``."""
        return self.forward_head(self.forward_features(x))


def _build(name: str, pretrained: bool, kwargs: dict[str, Any], **arch: Any) -> SmallResNet:
    kwargs = strip_entrypoint_kwargs(name, pretrained, kwargs)
    allowed = {"in_chans", "num_classes", "drop_rate"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"model '{name}' does not accept argument(s) {unknown}; it accepts {sorted(allowed)}"
        )
    # Like timm models, a classifier (10 classes, CIFAR-10) unless num_classes=0 is asked for.
    kwargs.setdefault("num_classes", 10)
    model = SmallResNet(**arch, **kwargs)
    attach_pretrained_cfg(model, name)
    return model


@register_model
def wrn28_2(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """Pre-activation Wide-ResNet-28-2: 16-channel stem, 3 stages x 4 blocks of widths 32/64/128, 128-d.

    WRN-d-k has (d - 4) / 6 blocks per stage and widths 16k / 32k / 64k; d = 28, k = 2 gives 4 and 32/64/128.
    Parameter count: 1,466,320 without classifier; with the 10-class classifier (128 * 10 + 10 = 1,290 more)
    1,467,610, which is the "1.47M" usually quoted for WRN-28-2 (e.g. MixMatch, FixMatch). The count is
    convolutions without bias, BatchNorm affine weights, and 1x1 projection shortcuts at each stage's start.
    """
    return _build(
        name="wrn28_2",
        pretrained=pretrained,
        kwargs=kwargs,
        block="preact",
        stem_width=16,
        widths=(32, 64, 128),
        depth_per_stage=4,
    )


@register_model
def cnn_w16(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """Tiny ResNet-like CNN for CPU demos: 16-channel stem, one basic block per stage (16/32/64), 64-d."""
    return _build(
        name="cnn_w16",
        pretrained=pretrained,
        kwargs=kwargs,
        block="basic",
        stem_width=16,
        widths=(16, 32, 64),
        depth_per_stage=1,
    )


@register_model
def cnn_w32(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """``cnn_w16`` at width 32: stages 32/64/128, 128-d features."""
    return _build(
        name="cnn_w32",
        pretrained=pretrained,
        kwargs=kwargs,
        block="basic",
        stem_width=32,
        widths=(32, 64, 128),
        depth_per_stage=1,
    )
