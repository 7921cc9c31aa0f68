"""Tests of paws_cli.models: registered backbones, heads, and the resolution-grouped PAWS encoder."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from paws_cli.models import PAWS_BACKBONES, PAWSEncoder, PredictionHead, ProjectionHead, create_encoder
from paws_cli.models.small import BasicBlock, PreActBlock

META = torch.device("meta")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that eval-mode checks mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)


def bn_eval(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Eval-mode BatchNorm written out by hand (channels on dim 1)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


# ---------------------------------------------------------------------------------------------------------
# SimCLR-style wide ResNet-50


def rn50_param_count(width: int, in_chans: int = 3) -> int:
    """Independent count: 7x7 stem, [3, 4, 6, 3] bottlenecks 1x1-3x3-1x1 (x4 expansion), all widths x width."""
    stem = 64 * width
    total = in_chans * stem * 49 + 2 * stem
    c_in = stem
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        mid, out = planes * width, 4 * planes * width
        for b in range(blocks):
            total += c_in * mid + 9 * mid * mid + mid * out + 2 * (mid + mid + out)
            if b == 0:  # projection shortcut: 1x1 conv + BN
                total += c_in * out + 2 * out
            c_in = out
    return total


@pytest.mark.parametrize(("width", "approx"), [(1, 23.5e6), (2, 94e6), (4, 375e6)])
def test_wide_resnet_param_counts_and_dims(width: int, approx: float):
    model = timm.create_model(f"resnet50x{width}", num_classes=0, device=META)
    count = n_params(model)
    assert count == rn50_param_count(width)
    assert abs(count - approx) / approx < 0.01
    assert model.num_features == 2048 * width
    # SimCLR-style: the stem is widened too (timm's channels= alone keeps 64).
    assert model.conv1.weight.shape == (64 * width, 3, 7, 7)
    assert model.bn1.weight.shape == (64 * width,)
    assert model.layer4[-1].bn3.weight.shape == (2048 * width,)
    assert [f["num_chs"] for f in model.feature_info] == [c * width for c in (64, 256, 512, 1024, 2048)]
    # Shape propagation on the meta device checks every layer connects, at no compute cost.
    out = model(torch.empty(2, 3, 224, 224, device=META))
    assert out.shape == (2, 2048 * width)


def test_wide_resnet_meta_via_default_device_and_in_chans():
    with META:
        model = timm.create_model("resnet50x2", num_classes=0, in_chans=1)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert n_params(model) == rn50_param_count(2, in_chans=1)


@pytest.mark.parametrize("num_classes", [0, 1000])
def test_resnet50x1_matches_timm_resnet50_shapes(num_classes: int):
    ours = timm.create_model("resnet50x1", num_classes=num_classes, device=META).state_dict()
    ref = timm.create_model("resnet50", num_classes=num_classes, device=META).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)


def test_resnet50x1_tiny_forward():
    torch.manual_seed(0)
    model = timm.create_model("resnet50x1", num_classes=0).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2048)
    assert torch.isfinite(out).all()


def test_wide_resnet_bad_arguments():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("resnet50x2", pretrained=True)
    with pytest.raises(ValueError, match="channels"):
        timm.create_model("resnet50x2", channels=(1, 2, 3, 4), device=META)


# ---------------------------------------------------------------------------------------------------------
# Small-image backbones


def wrn_param_count(in_chans: int, k: int = 2, n: int = 4, num_classes: int = 0) -> int:
    """Independent count of a pre-activation WRN-(6n+4)-k: convs without bias, BN affine, 1x1 shortcuts."""
    total = in_chans * 16 * 9
    c = 16
    for w in (16 * k, 32 * k, 64 * k):
        for b in range(n):
            total += 2 * c + 9 * c * w + 2 * w + 9 * w * w
            if b == 0:
                total += c * w
            c = w
    total += 2 * c  # final BN
    return total + (c * num_classes + num_classes if num_classes else 0)


def test_wrn28_2_param_count_and_output():
    model = timm.create_model("wrn28_2", num_classes=0)
    # 1,466,320 without classifier; + 1,290 for a 10-class Linear = 1,467,610, the quoted "1.47M".
    assert n_params(model) == wrn_param_count(3) == 1_466_320
    assert n_params(timm.create_model("wrn28_2", num_classes=10)) == 1_467_610
    assert n_params(timm.create_model("wrn28_2", num_classes=0, in_chans=1)) == wrn_param_count(1)
    assert model.num_features == 128
    assert [len(s) for s in model.stages] == [4, 4, 4]
    x = torch.randn(3, 3, 32, 32)
    fmap = model.forward_features(x)
    assert fmap.shape == (3, 128, 8, 8)
    out = model(x)
    assert out.shape == (3, 128)
    # Final BN-ReLU then average pool: features are non-negative and equal the pooled map.
    assert (out >= 0).all()
    torch.testing.assert_close(out, fmap.mean(dim=(2, 3)))


@pytest.mark.parametrize(("name", "dim"), [("cnn_w16", 64), ("cnn_w32", 128), ("wrn28_2", 128)])
@pytest.mark.parametrize(("in_chans", "size"), [(1, 28), (3, 32), (1, 16)])
def test_small_backbones_shapes(name: str, dim: int, in_chans: int, size: int):
    model = timm.create_model(name, num_classes=0, in_chans=in_chans)
    assert model.num_features == dim
    assert model(torch.randn(2, in_chans, size, size)).shape == (2, dim)


def test_small_backbone_head_api():
    torch.manual_seed(0)
    model = timm.create_model("cnn_w16", num_classes=5, in_chans=1).eval()
    x = torch.randn(4, 1, 28, 28)
    fmap = model.forward_features(x)
    pooled = model.forward_head(fmap, pre_logits=True)
    assert pooled.shape == (4, 64)
    torch.testing.assert_close(model(x), pooled @ model.fc.weight.T + model.fc.bias)
    model.reset_classifier(3)
    assert model(x).shape == (4, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pooled)
    with pytest.raises(ValueError, match="in_chans"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="does not accept"):
        timm.create_model("cnn_w16", depth=3)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("wrn28_2", pretrained=True)


def test_preact_block_matches_manual_computation():
    torch.manual_seed(0)
    for in_ch, out_ch, stride in [(4, 6, 2), (6, 6, 1)]:
        block = PreActBlock(in_ch, out_ch, stride).double().eval()
        randomize_bn(block, seed=in_ch)
        x = torch.randn(2, in_ch, 8, 8, dtype=torch.float64)
        act = torch.relu(bn_eval(x, block.bn1))
        # Pre-activation: a projection shortcut reads BN-ReLU(x); an identity shortcut the raw x.
        skip = x if block.shortcut is None else F.conv2d(act, block.shortcut.weight, stride=stride)
        y = F.conv2d(act, block.conv1.weight, stride=stride, padding=1)
        y = F.conv2d(torch.relu(bn_eval(y, block.bn2)), block.conv2.weight, padding=1)
        with torch.no_grad():
            torch.testing.assert_close(block(x), y + skip)
        assert (block.shortcut is None) == (in_ch == out_ch and stride == 1)


def test_basic_block_matches_manual_computation():
    torch.manual_seed(0)
    block = BasicBlock(4, 6, 2).double().eval()
    randomize_bn(block)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    y = torch.relu(bn_eval(F.conv2d(x, block.conv1.weight, stride=2, padding=1), block.bn1))
    y = bn_eval(F.conv2d(y, block.conv2.weight, padding=1), block.bn2)
    skip = bn_eval(F.conv2d(x, block.shortcut[0].weight, stride=2), block.shortcut[1])
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(y + skip))


@pytest.mark.parametrize("name", PAWS_BACKBONES)
def test_all_registered_names_create(name: str):
    assert timm.is_model(name)
    model = timm.create_model(name, num_classes=0, device=META if name.startswith("resnet50x") else None)
    assert model.num_features > 0
    assert model.pretrained_cfg["architecture"] == name


# ---------------------------------------------------------------------------------------------------------
# Heads


def test_projection_head_structure_and_values():
    head = ProjectionHead(8, 16, 4, num_layers=3).double().eval()
    types = [type(m) for m in head.first] + [type(m) for m in head.middle[0]]
    assert types == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2
    assert (head.first.fc.in_features, head.first.fc.out_features) == (8, 16)
    assert (head.middle[0].fc.in_features, head.middle[0].fc.out_features) == (16, 16)
    assert len(head.middle) == 1 and isinstance(head.last, nn.Linear)
    assert (head.last.in_features, head.last.out_features) == (16, 4)
    randomize_bn(head)
    x = torch.randn(5, 8, dtype=torch.float64)
    y = torch.relu(bn_eval(x @ head.first.fc.weight.T + head.first.fc.bias, head.first.bn))
    blk = head.middle[0]
    y = torch.relu(bn_eval(y @ blk.fc.weight.T + blk.fc.bias, blk.bn))
    with torch.no_grad():
        torch.testing.assert_close(head(x), y @ head.last.weight.T + head.last.bias)

    two = ProjectionHead(8, 16, 4, num_layers=2)
    assert len(two.middle) == 0 and two.last.in_features == 16
    assert sum(isinstance(m, nn.Linear) for m in two.modules()) == 2
    for bad in (0, 1):
        with pytest.raises(ValueError, match="num_layers"):
            ProjectionHead(8, 16, 4, num_layers=bad)
    with pytest.raises(ValueError, match="out_dim"):
        ProjectionHead(8, 16, 0)


def test_prediction_head_structure_and_values():
    head = PredictionHead(8, 2).double().eval()
    assert [type(m) for m in head] == [nn.BatchNorm1d, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head.bn_in.num_features == 8 and head.bn1.num_features == 2
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (8, 2, 8)
    randomize_bn(head)
    x = torch.randn(5, 8, dtype=torch.float64)
    y = bn_eval(x, head.bn_in) @ head.fc1.weight.T + head.fc1.bias
    y = torch.relu(bn_eval(y, head.bn1)) @ head.fc2.weight.T + head.fc2.bias
    with torch.no_grad():
        torch.testing.assert_close(head(x), y)


# ---------------------------------------------------------------------------------------------------------
# Encoder


class BNPool(nn.Module):
    """Backbone whose output is easy to compute by hand: BatchNorm2d without affine, then average pool."""

    num_features = 3

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x).mean(dim=(2, 3))


def test_train_mode_batchnorm_statistics_are_per_resolution_group():
    g = torch.Generator().manual_seed(0)
    # Groups: [a, b] (4x4), [c] (2x2), [d] (4x4 again, but not adjacent to a, b); shifted means per view.
    shapes = [(2, 4), (3, 4), (5, 2), (2, 4)]
    views = [torch.randn(n, 3, s, s, generator=g, dtype=torch.float64) + i for i, (n, s) in enumerate(shapes)]
    enc = PAWSEncoder(BNPool()).double().train()
    h, z = enc(views)
    assert z is h

    def by_hand(group: torch.Tensor) -> torch.Tensor:
        mu = group.mean(dim=(0, 2, 3))
        var = group.var(dim=(0, 2, 3), unbiased=False)
        return (group.mean(dim=(2, 3)) - mu) / torch.sqrt(var + 1e-5)

    expected = torch.cat([by_hand(torch.cat(views[:2])), by_hand(views[2]), by_hand(views[3])])
    torch.testing.assert_close(h, expected)
    # Running each view on its own would give a different answer: the grouping really matters.
    separate = torch.cat([by_hand(v) for v in views])
    assert (h - separate).abs().max() > 0.1


def small_encoder(pred: bool = True) -> PAWSEncoder:
    torch.manual_seed(0)
    enc = create_encoder("cnn_w16", 1, 32, 16, 3, 8 if pred else None)
    randomize_bn(enc)
    return enc


def test_grouped_forward_train_mode_matches_manual_groups():
    enc = small_encoder().train()
    g = torch.Generator().manual_seed(1)
    sup, v1, v2 = (torch.randn(n, 1, 28, 28, generator=g) for n in (6, 4, 4))
    smalls = [torch.randn(4, 1, 16, 16, generator=g) for _ in range(2)]
    h, z = enc([sup, v1, v2, *smalls])
    assert h.shape == (22, 16) and z.shape == (22, 16)

    def manual(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hh = enc.projection(enc.backbone(x))
        return hh, enc.prediction(hh)

    (h_big, z_big), (h_small, z_small) = manual(torch.cat([sup, v1, v2])), manual(torch.cat(smalls))
    torch.testing.assert_close(h, torch.cat([h_big, h_small]))
    torch.testing.assert_close(z, torch.cat([z_big, z_small]))
    h_sep = torch.cat([manual(v)[0] for v in (sup, v1, v2, *smalls)])
    assert (h - h_sep).abs().max() > 1e-2


def test_grouped_forward_eval_equals_per_view():
    enc = small_encoder().eval()
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(n, 1, s, s, generator=g) for n, s in ((3, 28), (2, 28), (4, 16), (2, 28))]
    with torch.no_grad():
        h, z = enc(views)
        parts = [enc([v]) for v in views]
    torch.testing.assert_close(h, torch.cat([p[0] for p in parts]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, torch.cat([p[1] for p in parts]), atol=1e-5, rtol=1e-5)


def test_single_tensor_group_is_not_copied():
    enc = small_encoder().eval()
    seen: list[torch.Tensor] = []
    enc.backbone.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    x, y = torch.randn(2, 1, 28, 28), torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        enc([x, y])
    assert seen[0] is x and seen[1] is y


def test_embed_options_and_shapes():
    enc = small_encoder().eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        h, z = enc([x])
        feats = enc.embed(x, "backbone")
        assert feats.shape == (3, enc.feature_dim) == (3, 64)
        torch.testing.assert_close(enc.embed(x, "projection"), h)
        torch.testing.assert_close(enc.embed(x, "prediction"), z)
        torch.testing.assert_close(enc.projection(feats), h)
        assert not torch.allclose(h, z)
    with pytest.raises(ValueError, match="which"):
        enc.embed(x, "logits")  # type: ignore[arg-type]
    no_pred = small_encoder(pred=False).eval()
    with torch.no_grad():
        h, z = no_pred([x])
        assert z is h
        torch.testing.assert_close(no_pred.embed(x, "prediction"), h)


def test_create_encoder_options():
    enc = create_encoder("wrn28_2", 3, None, 128, 3, None)
    assert isinstance(enc.projection, ProjectionHead) and enc.prediction is None
    assert enc.projection.first.fc.out_features == 128 == enc.feature_dim  # hidden defaults to features
    assert len(enc.projection.middle) == 1 and enc.out_dim == 128
    enc = create_encoder("cnn_w16", 1, 48, 24, 2, 6)
    assert enc.projection.first.fc.out_features == 48 and len(enc.projection.middle) == 0
    assert isinstance(enc.prediction, PredictionHead) and enc.prediction.fc1.out_features == 6
    assert enc.prediction.fc2.out_features == 24 == enc.out_dim
    h, z = enc([torch.randn(2, 1, 28, 28)])
    assert h.shape == z.shape == (2, 24)
    enc = create_encoder("cnn_w16", 1, None, 999, 0, None)
    assert isinstance(enc.projection, nn.Identity) and enc.out_dim == 64
    assert enc([torch.randn(2, 1, 28, 28)])[0].shape == (2, 64)


def test_create_encoder_errors():
    with pytest.raises(ValueError, match="wrn28_2") as err:
        create_encoder("wrn_28_2", 3, None, 128, 3, None)
    assert "unknown backbone 'wrn_28_2'" in str(err.value)
    with pytest.raises(ValueError, match="proj_layers"):
        create_encoder("cnn_w16", 1, None, 16, 1, None)
    with pytest.raises(ValueError, match="in_chans"):
        create_encoder("cnn_w16", 0, None, 16, 2, None)
    enc = small_encoder()
    with pytest.raises(ValueError, match="non-empty"):
        enc([])
    with pytest.raises(ValueError, match="view 1"):
        enc([torch.randn(2, 1, 28, 28), torch.randn(1, 28, 28)])
