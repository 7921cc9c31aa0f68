"""Tests of the batched multi-crop augmentations against torchvision's definitions and their sampling laws."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision import transforms

from paws_cli.data.augment import color_ops
from paws_cli.data.augment.views import (
    MultiCropAugment,
    ViewSpec,
    apply_view_params,
    crop_resize,
    eval_transform,
    random_resized_crop_boxes,
    sample_view_params,
)

# A spec that keeps the image as it is: full-image crop at the image size and every op switched off.
PLAIN = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def natural_rgb(n: int, size: int, seed: int) -> torch.Tensor:
    """Photo-like uint8 RGB images: smooth colour fields plus grain, with saturated and gray patches."""
    g = gen(seed)
    coarse = torch.rand(n, 3, 5, 5, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    img = (smooth + 0.08 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    img[:, :, :3, :3] = img[:, :1, :3, :3]  # gray pixels (r = g = b): hue undefined
    img[:, 0, -3:, -3:], img[:, 1:, -3:, -3:] = 1.0, 0.0  # pure red, exact 0/1 values
    return (img * 255).round().to(torch.uint8)


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float32) / 255.0


def z_close(a: torch.Tensor, b: torch.Tensor, z: float = 4.5) -> bool:
    """Two-sample z-test of equal means."""
    a, b = a.double(), b.double()
    se = math.sqrt(a.var().item() / a.numel() + b.var().item() / b.numel())
    return abs(a.mean().item() - b.mean().item()) <= z * se


def rate_ok(flags: torch.Tensor, p: float, z: float = 4.0) -> bool:
    return abs(flags.double().mean().item() - p) <= z * math.sqrt(p * (1 - p) / flags.numel()) + 1e-12


# ----------------------------------------------------------------------------- random resized crop


def tv_boxes(n: int, height: int, width: int, scale: tuple, ratio: tuple, seed: int) -> torch.Tensor:
    """Boxes from torchvision's RandomResizedCrop.get_params, without disturbing the global RNG."""
    img = torch.zeros(1, height, width)
    rows = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(n):
            i, j, h, w = transforms.RandomResizedCrop.get_params(img, list(scale), list(ratio))
            rows.append((j, i, j + w, i + h))
    return torch.tensor(rows, dtype=torch.float32)


def box_stats(boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return {
        "area": w * h / (height * width),
        "log_aspect": torch.log(w / h),
        "cx": (boxes[:, 0] + boxes[:, 2]) / (2 * width),
        "cy": (boxes[:, 1] + boxes[:, 3]) / (2 * height),
    }


def test_rrc_boxes_inside_integer_and_in_range() -> None:
    boxes = random_resized_crop_boxes(5000, 48, 64, (0.08, 1.0), (3 / 4, 4 / 3), gen(0))
    assert boxes.shape == (5000, 4) and boxes.dtype == torch.float32
    assert torch.equal(boxes, boxes.round())
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 64).all() and (boxes[:, 3] <= 48).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    s = box_stats(boxes, 48, 64)
    # Rounding w and h to whole pixels moves the area by at most about one row and one column.
    assert s["area"].min() >= 0.08 - 2 * (1 / 48 + 1 / 64) and s["area"].max() <= 1.0
    assert s["log_aspect"].abs().max() <= math.log(4 / 3) + 2 / 20
    # Independent draws per sample: almost all boxes are distinct.
    assert len({tuple(b) for b in boxes.tolist()}) > 0.9 * len(boxes)


@pytest.mark.parametrize(("height", "width", "scale"), [(48, 64, (0.08, 1.0)), (40, 40, (0.3, 0.75))])
def test_rrc_distribution_matches_torchvision(height: int, width: int, scale: tuple) -> None:
    n, ratio = 6000, (3 / 4, 4 / 3)
    ours = box_stats(random_resized_crop_boxes(n, height, width, scale, ratio, gen(1)), height, width)
    ref = box_stats(tv_boxes(n, height, width, scale, ratio, seed=2), height, width)
    for key in ours:
        assert z_close(ours[key], ref[key]), key
        assert abs(ours[key].std().item() - ref[key].std().item()) < 0.1 * ref[key].std().item(), key
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        for key, tol in (("area", 0.04), ("log_aspect", 0.03)):
            diff = abs(ours[key].quantile(q).item() - ref[key].quantile(q).item())
            assert diff <= tol, (key, q, diff)


def test_rrc_fallback_matches_torchvision() -> None:
    # A 16x96 strip with big target areas: no attempt fits, so every box is the ratio-clamped central crop.
    boxes = random_resized_crop_boxes(200, 16, 96, (0.5, 1.0), (3 / 4, 4 / 3), gen(3))
    expected = tv_boxes(1, 16, 96, (0.5, 1.0), (3 / 4, 4 / 3), seed=0)[0]
    assert torch.equal(expected, torch.tensor([37.0, 0.0, 58.0, 16.0]))
    assert torch.equal(boxes, expected.expand_as(boxes))
    # Mid-sized areas: only some samples exhaust their 10 attempts; the fallback rate must match.
    n, scale = 6000, (0.15, 0.35)
    fb = torch.tensor([37.0, 0.0, 58.0, 16.0])
    ours = (random_resized_crop_boxes(n, 16, 96, scale, (3 / 4, 4 / 3), gen(4)) == fb).all(1).float()
    ref = (tv_boxes(n, 16, 96, scale, (3 / 4, 4 / 3), seed=5) == fb).all(1).float()
    assert 0.02 < ref.mean() < 0.98
    assert z_close(ours, ref)


# ----------------------------------------------------------------------------- crop and resize


def test_crop_resize_full_box_is_identity() -> None:
    x = torch.rand(3, 3, 20, 20, generator=gen(6))
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0]]).expand(3, 4)
    torch.testing.assert_close(crop_resize(x, boxes, 20), x, atol=1e-5, rtol=0)


def test_crop_resize_hand_computed_gradient() -> None:
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    img = (xx + 10 * yy).view(1, 1, 8, 8)
    # Downscale: a 4 wide x 8 tall box to 2x2 averages 2x4 pixel blocks.
    out = crop_resize(img, torch.tensor([[2.0, 0.0, 6.0, 8.0]]), 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[17.5, 19.5], [57.5, 59.5]]), atol=1e-5, rtol=0)
    # Upscale x2: samples at pixel-centre coordinates 0.75, 1.25, 1.75, 2.25, linear in the gradient.
    out = crop_resize(img, torch.tensor([[1.0, 1.0, 3.0, 3.0]]), 4)
    pos = torch.tensor([0.75, 1.25, 1.75, 2.25])
    torch.testing.assert_close(out[0, 0], pos.view(1, 4) + 10 * pos.view(4, 1), atol=1e-5, rtol=0)
    # At the image border the sample at -0.25 is clamped to pixel 0.
    out = crop_resize(img, torch.tensor([[0.0, 0.0, 2.0, 2.0]]), 4)
    pos = torch.tensor([0.0, 0.25, 0.75, 1.25])
    torch.testing.assert_close(out[0, 0], pos.view(1, 4) + 10 * pos.view(4, 1), atol=1e-5, rtol=0)


def test_crop_resize_matches_interpolate_and_pooling() -> None:
    x = torch.rand(2, 3, 12, 12, generator=gen(7))
    full = torch.tensor([[0.0, 0.0, 12.0, 12.0]]).expand(2, 4)
    up = F.interpolate(x, size=(30, 30), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crop_resize(x, full, 30), up, atol=1e-5, rtol=0)
    torch.testing.assert_close(crop_resize(x, full, 4), F.avg_pool2d(x, 3), atol=1e-5, rtol=0)
    # index= picks the source image of each box.
    out = crop_resize(x, full[:1].expand(3, 4), 12, index=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(out, x[[1, 0, 1]], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- photometric ops


def per_sample_reference(x: torch.Tensor, fn, factors: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(x[i], float(factors[i])) for i in range(len(x))])


@pytest.mark.parametrize(
    ("ours", "theirs", "low", "high", "atol"),
    [
        (color_ops.adjust_brightness, TF.adjust_brightness, 0.2, 1.8, 1e-4),
        (color_ops.adjust_contrast, TF.adjust_contrast, 0.2, 1.8, 1e-4),
        (color_ops.adjust_saturation, TF.adjust_saturation, 0.2, 1.8, 1e-4),
        (color_ops.adjust_hue, TF.adjust_hue, -0.5, 0.5, 1e-3),
    ],
)
def test_jitter_ops_match_torchvision(ours, theirs, low: float, high: float, atol: float) -> None:
    x = as_float(natural_rgb(12, 24, seed=8))
    factors = low + (high - low) * torch.rand(12, generator=gen(9))
    factors[0], factors[1] = low, high
    torch.testing.assert_close(ours(x, factors), per_sample_reference(x, theirs, factors), atol=atol, rtol=0)
    gray = x[:, :1]
    torch.testing.assert_close(
        ours(gray, factors), per_sample_reference(gray, theirs, factors), atol=atol, rtol=0
    )


def test_hue_is_a_rotation() -> None:
    x = as_float(natural_rgb(4, 16, seed=10))
    # Shifting by +0.3 then -0.3 gives the image back, a full turn's worth of shifts too.
    back = color_ops.adjust_hue(color_ops.adjust_hue(x, torch.full((4,), 0.3)), torch.full((4,), -0.3))
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="hue factors"):
        color_ops.adjust_hue(x, torch.full((4,), 0.6))


def test_grayscale_solarize_match_torchvision() -> None:
    x = as_float(natural_rgb(6, 20, seed=11))
    torch.testing.assert_close(color_ops.rgb_to_grayscale(x), TF.rgb_to_grayscale(x, 3), atol=1e-6, rtol=0)
    assert torch.equal(color_ops.rgb_to_grayscale(x[:, :1]), x[:, :1])
    assert torch.equal(color_ops.solarize(x), TF.solarize(x, 0.5))


def test_blur_matches_torchvision() -> None:
    x = as_float(natural_rgb(6, 24, seed=12))
    sigma = 0.1 + 1.9 * torch.rand(6, generator=gen(13))
    for k in (3, 7):
        ref = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) for i in range(6)])
        torch.testing.assert_close(color_ops.gaussian_blur(x, sigma, k), ref, atol=1e-5, rtol=0)
    assert [color_ops.blur_kernel_size(s, 0.1) for s in (16, 28, 32, 96, 224)] == [3, 3, 3, 11, 23]
    with pytest.raises(ValueError, match="kernel"):
        color_ops.gaussian_blur(x[:, :, :3, :3], sigma, 7)


def test_equalize_matches_torchvision() -> None:
    u8 = natural_rgb(6, 20, seed=14)
    u8[0, 1] = 77  # one level only: left as it is
    u8[1, 2] = torch.where(torch.rand(20, 20, generator=gen(15)) < 0.5, 10, 200).to(torch.uint8)
    u8[2, 0, :, :10] = 255  # half the pixels in the top level
    ref = TF.equalize(u8)
    out = color_ops.equalize(as_float(u8))
    assert torch.equal((out * 255).round().to(torch.uint8), ref)
    assert torch.equal((color_ops.equalize(as_float(u8[:, :1])) * 255).round().to(torch.uint8), ref[:, :1])


# ----------------------------------------------------------------------------- parameter sampling


def test_param_rates_and_ranges() -> None:
    spec = ViewSpec(16, (0.3, 1.0), flip_p=0.3, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    spec = dataclasses.replace(spec, solarize_p=0.2, equalize_p=0.1, jitter_strength=0.5)
    p = sample_view_params(1000, 32, 32, spec, 4, gen(16))
    for name in ("flip", "jitter", "grayscale", "blur", "solarize", "equalize"):
        assert rate_ok(getattr(p, name), getattr(spec, name + "_p")), name
    assert rate_ok(p.solarize & p.equalize, 0.02) and rate_ok(p.flip & p.grayscale, 0.06)
    # Ranges are ColorJitter's, and the draws fill them uniformly.
    cj = transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)
    ranges = [cj.brightness, cj.contrast, cj.saturation, cj.hue]
    np.testing.assert_allclose(np.array(spec.jitter_ranges()), np.array(ranges), atol=1e-12)
    for k, (lo, hi) in enumerate(ranges):
        f = p.factors[:, k]
        assert f.min() >= lo - 1e-6 and f.max() <= hi + 1e-6
        assert f.min() < lo + 0.01 * (hi - lo) and f.max() > hi - 0.01 * (hi - lo)
        assert abs(f.mean().item() - (lo + hi) / 2) < 4 * (hi - lo) / math.sqrt(12 * 4000)
    lo, hi = spec.blur_sigma
    assert p.sigma.min() >= lo and p.sigma.max() <= hi and z_close(p.sigma, lo + (hi - lo) * torch.rand(4000))
    # Every row of the jitter order is a permutation, and each op is equally likely at each step.
    assert torch.equal(p.jitter_order.sort(dim=1).values, torch.arange(4).expand(4000, 4))
    for step in range(4):
        for code in range(4):
            assert rate_ok(p.jitter_order[:, step] == code, 0.25), (step, code)
    assert torch.equal(p.source, torch.arange(4000) % 1000)


def test_viewspec_validation() -> None:
    for bad in (
        dict(size=0),
        dict(scale=(0.5, 0.2)),
        dict(scale=(0.0, 1.0)),
        dict(ratio=(2.0, 1.0)),
        dict(flip_p=1.5),
        dict(jitter_strength=3.0),
        dict(blur_sigma=(0.0, 1.0)),
        dict(blur_kernel_frac=0.0),
    ):
        kwargs = dict(size=32, scale=(0.3, 1.0)) | bad
        with pytest.raises(ValueError, match="ViewSpec"):
            ViewSpec(**kwargs)


# ----------------------------------------------------------------------------- the view pipeline


def test_flip_in_pipeline() -> None:
    x = as_float(natural_rgb(500, 8, seed=17))
    spec = ViewSpec(8, **(PLAIN | dict(flip_p=0.5)))
    p = sample_view_params(500, 8, 8, spec, 1, gen(18))
    out = apply_view_params(x, p, spec)
    expected = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert rate_ok(p.flip, 0.5)


def test_jitter_pipeline_matches_torchvision_sequence() -> None:
    u8 = natural_rgb(40, 16, seed=19)
    for x in (as_float(u8), as_float(u8[:, :1])):
        spec = ViewSpec(16, **(PLAIN | dict(jitter_p=0.8)))
        p = sample_view_params(40, 16, 16, spec, 1, gen(20))
        out = apply_view_params(x, p, spec)
        fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in range(40):
            ref = x[i]
            if p.jitter[i]:
                for code in p.jitter_order[i].tolist():
                    ref = fns[code](ref, float(p.factors[i, code]))
            torch.testing.assert_close(out[i], ref, atol=1e-3, rtol=0)
        assert 20 < int(p.jitter.sum()) < 40


def test_gray_blur_solarize_equalize_pipeline() -> None:
    x = as_float(natural_rgb(60, 20, seed=21))
    spec = ViewSpec(20, **(PLAIN | dict(grayscale_p=0.5, blur_p=0.5, solarize_p=0.5, equalize_p=0.5)))
    p = sample_view_params(60, 20, 20, spec, 1, gen(22))
    out = apply_view_params(x, p, spec)
    k = spec.blur_kernel_size
    for i in range(60):
        ref = x[i]
        ref = TF.rgb_to_grayscale(ref, 3) if p.grayscale[i] else ref
        ref = TF.gaussian_blur(ref, [k, k], [float(p.sigma[i])] * 2) if p.blur[i] else ref
        ref = TF.solarize(ref, 0.5) if p.solarize[i] else ref
        if p.equalize[i]:
            ref = TF.equalize((ref * 255).round().to(torch.uint8)).float() / 255
        torch.testing.assert_close(out[i], ref, atol=1.01 / 255 if p.equalize[i] else 1e-5, rtol=0)


def test_op_application_rates() -> None:
    # Each op visibly changes an image when (and only when) its flag is set, at its probability.
    x = as_float(natural_rgb(1, 12, seed=23)).expand(4000, 3, 12, 12).contiguous()
    for name in ("grayscale", "solarize", "flip"):
        spec = ViewSpec(12, **(PLAIN | {f"{name}_p": 0.3}))
        p = sample_view_params(4000, 12, 12, spec, 1, gen(24))
        changed = (apply_view_params(x, p, spec) - x).abs().flatten(1).amax(1) > 1e-4
        assert torch.equal(changed, getattr(p, name)) and rate_ok(changed, 0.3), name


# ----------------------------------------------------------------------------- multi-crop front end


def fmnist_augment() -> MultiCropAugment:
    return MultiCropAugment(
        ViewSpec(28, (0.3, 1.0)), ViewSpec(16, (0.1, 0.3)), num_large=2, num_small=4, mean=(0.3,), std=(0.35,)
    )


def test_multicrop_shapes_dtype_and_determinism() -> None:
    images = natural_rgb(8, 28, seed=25)[:, 0]  # (N, H, W) gray
    aug = fmnist_augment()
    views = aug(images, gen(26))
    assert [tuple(v.shape) for v in views] == [(8, 1, 28, 28)] * 2 + [(8, 1, 16, 16)] * 4
    assert all(v.dtype == torch.float32 for v in views)
    again = aug(images, gen(26))
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    other = aug(images, gen(27))
    assert all(not torch.equal(a, b) for a, b in zip(views, other, strict=True))
    supports = aug.augment_views(images, aug.large, 3, gen(28))
    assert [tuple(v.shape) for v in supports] == [(8, 1, 28, 28)] * 3


def test_views_independent_across_samples_and_views() -> None:
    same = natural_rgb(1, 28, seed=29).expand(16, 3, 28, 28).contiguous()
    aug = MultiCropAugment(
        ViewSpec(20, (0.2, 1.0)), ViewSpec(12, (0.1, 0.3)), 2, 2, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    views = aug(same, gen(30))
    for v in views:  # identical inputs, different draws per sample
        assert len({tuple(row.tolist()) for row in v.flatten(1)[:, ::37]}) == 16
    for a, b in ((views[0], views[1]), (views[2], views[3])):  # and per view
        assert not any(torch.equal(a[i], b[i]) for i in range(16))


def test_normalisation_of_constant_image() -> None:
    mean = (100 / 255, 30 / 255, 200 / 255)
    std = (0.2, 0.3, 0.4)
    images = torch.tensor([100, 30, 200], dtype=torch.uint8).view(1, 3, 1, 1).expand(5, 3, 24, 24)
    spec = ViewSpec(16, (0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, equalize_p=1.0)
    views = MultiCropAugment(spec, None, 2, 0, mean=mean, std=std)(images, gen(31))
    assert len(views) == 2
    for v in views:
        torch.testing.assert_close(v, torch.zeros_like(v), atol=1e-5, rtol=0)
    # Against a float64 re-computation of (x / 255 - mean) / std for a non-constant plain view.
    u8 = natural_rgb(3, 16, seed=32)
    out = MultiCropAugment(ViewSpec(16, **PLAIN), None, 1, 0, mean=mean, std=std)(u8, gen(0))[0]
    ref = (u8.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_bad_inputs_raise() -> None:
    aug = fmnist_augment()
    with pytest.raises(ValueError, match="one value per channel"):
        aug(natural_rgb(2, 28, seed=0), gen(0))
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.full((2, 28, 28), 200.0), gen(0))
    with pytest.raises(ValueError, match="small"):
        MultiCropAugment(ViewSpec(28, (0.3, 1.0)), None, 2, 4, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="mean"):
        MultiCropAugment(ViewSpec(28, (0.3, 1.0)), None, 2, 0)
    with pytest.raises(ValueError, match="channels"):
        aug(torch.zeros(2, 4, 28, 28, dtype=torch.uint8), gen(0))


# ----------------------------------------------------------------------------- evaluation transform


def test_eval_transform_matches_torchvision() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    u8 = natural_rgb(2, 40, seed=33)[:, :, :, :36]  # 40 tall x 36 wide
    ref = TF.normalize(TF.center_crop(TF.resize(as_float(u8), 32, antialias=True), [28, 28]), mean, std)
    torch.testing.assert_close(eval_transform(u8, mean, std, size=28, resize=32), ref, atol=1e-5, rtol=0)
    ref = TF.normalize(TF.center_crop(as_float(u8), [33, 33]), mean, std)
    torch.testing.assert_close(eval_transform(u8, mean, std, size=33), ref, atol=1e-6, rtol=0)
    plain = eval_transform(u8, mean, std)
    assert plain.shape == (2, 3, 40, 36)
    np.testing.assert_allclose(plain.numpy(), TF.normalize(as_float(u8), mean, std).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="centre-crop"):
        eval_transform(u8, mean, std, size=64)
