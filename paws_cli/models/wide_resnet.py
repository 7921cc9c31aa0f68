"""SimCLR-style wide ResNet-50 variants registered with timm: ``resnet50x1``, ``resnet50x2``, ``resnet50x4``.

These are torchvision-style ResNet-50s (stride on the 3x3 convolution of the bottleneck, i.e. timm's
``Bottleneck``) in which *every* channel count is multiplied by the width, the 7x7 stem included. Their pooled
outputs are 2048 / 4096 / 8192-d and, without a classifier, they hold about 23.5M / 94M / 375M parameters.
timm's ``wide_resnet50_2`` is a different network (only the bottleneck's inner width grows, 2048-d output).

After ``import paws_cli.models`` they are available as ``timm.create_model("resnet50x2", num_classes=0)``.
Spec: PAWS-SPEC.md section 4.
"""

from __future__ import annotations

from typing import Any

import timm.models
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

__all__ = ["build_wide_resnet50", "resnet50x1", "resnet50x2", "resnet50x4", "strip_entrypoint_kwargs"]

#: Channel counts of the four ResNet-50 stages (bottleneck inner widths) at width 1.
_BASE_CHANNELS = (64, 128, 256, 512)
_BASE_STEM = 64
_RESNET50_LAYERS = (3, 4, 6, 3)

# Metadata only (no weights exist for these): lets timm utilities such as resolve_data_config work on them.
default_cfgs = generate_default_cfgs(
    {
        name: {
            "url": "",
            "num_classes": 1000,
            "input_size": (3, 224, 224),
            "pool_size": (7, 7),
            "crop_pct": 0.875,
            "interpolation": "bilinear",
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "first_conv": "conv1",
            "classifier": "fc",
        }
        for name in ("resnet50x1", "resnet50x2", "resnet50x4")
    }
)


def strip_entrypoint_kwargs(name: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop the bookkeeping arguments timm.create_model passes to every entrypoint; refuse ``pretrained``.

    These models have no published weights, so ``pretrained=True`` raises instead of silently returning a
    randomly initialised network (which is what timm does with a warning).
    """
    if pretrained:
        raise ValueError(
            f"model '{name}' has no pretrained weights; call timm.create_model('{name}', pretrained=False) "
            "and load a checkpoint of your own (e.g. with checkpoint_path=...)."
        )
    rest = dict(kwargs)
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        rest.pop(key, None)
    return rest


def attach_pretrained_cfg(model: nn.Module, name: str) -> None:
    """Set ``pretrained_cfg``/``default_cfg`` on a model built outside timm's ``build_model_with_cfg``."""
    cfg = timm.models.get_pretrained_cfg(name)
    cfg_dict = cfg.to_dict() if cfg is not None else {"architecture": name}
    model.pretrained_cfg = cfg_dict
    model.default_cfg = cfg_dict


def _widen_stem(model: ResNet, stem_width: int) -> None:
    """Replace the 64-channel 7x7 stem of a timm ResNet by a ``stem_width`` one, fixing layer1's inputs.

    timm's ResNet hard-codes 64 stem channels for the plain 7x7 stem (``stem_width`` only affects the deep
    stems), so the stem and the two layers that read it (layer1's first 1x1 conv and its downsample conv)
    are rebuilt here. Everything else is already widened through ``channels=``.
    """
    old_conv = model.conv1
    assert isinstance(old_conv, nn.Conv2d), "expected the plain 7x7 stem"
    dd = {"device": old_conv.weight.device, "dtype": old_conv.weight.dtype}
    model.conv1 = nn.Conv2d(
        old_conv.in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False, **dd
    )
    model.bn1 = nn.BatchNorm2d(stem_width, **dd)

    first_block = model.layer1[0]
    assert isinstance(first_block, Bottleneck) and first_block.downsample is not None
    old = first_block.conv1
    first_block.conv1 = nn.Conv2d(stem_width, old.out_channels, kernel_size=1, bias=False, **dd)
    old = first_block.downsample[0]
    first_block.downsample[0] = nn.Conv2d(
        stem_width, old.out_channels, kernel_size=1, stride=old.stride, bias=False, **dd
    )
    # Same initialisation as timm's ResNet.init_weights gives every other convolution.
    for conv in (model.conv1, first_block.conv1, first_block.downsample[0]):
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    model.feature_info[0]["num_chs"] = stem_width


def build_wide_resnet50(width: int, **kwargs: Any) -> ResNet:
    """A SimCLR-style ResNet-50 with every channel count (stem included) multiplied by ``width``.

    ``kwargs`` go to timm's ``ResNet`` (``num_classes``, ``in_chans``, ``drop_path_rate``, ``device``, ...).
    """
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"wide ResNet-50 width must be a positive integer, got {width!r}")
    for key in ("block", "layers", "channels", "stem_width", "stem_type", "base_width", "cardinality"):
        if key in kwargs:
            raise ValueError(
                f"argument '{key}' is fixed by the resnet50x{width} architecture and cannot be overridden"
            )
    channels = tuple(c * width for c in _BASE_CHANNELS)
    model = ResNet(block=Bottleneck, layers=_RESNET50_LAYERS, channels=channels, **kwargs)
    if width != 1:
        _widen_stem(model, _BASE_STEM * width)
    return model


def _entrypoint(name: str, width: int, pretrained: bool, kwargs: dict[str, Any]) -> ResNet:
    model = build_wide_resnet50(width, **strip_entrypoint_kwargs(name, pretrained, kwargs))
    attach_pretrained_cfg(model, name)
    return model


@register_model
def resnet50x1(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 (width 1): identical in layout to timm's ``resnet50``; 2048-d features, ~23.5M params."""
    return _entrypoint("resnet50x1", 1, pretrained, kwargs)


@register_model
def resnet50x2(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """SimCLR-style ResNet-50 (2x): 128-channel stem, 4096-d features, ~94M params without classifier."""
    return _entrypoint("resnet50x2", 2, pretrained, kwargs)


@register_model
def resnet50x4(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """SimCLR-style ResNet-50 (4x): 256-channel stem, 8192-d features, ~375M params without classifier."""
    return _entrypoint("resnet50x4", 4, pretrained, kwargs)
