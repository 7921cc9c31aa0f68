"""The FFCV back end's CPU colour ops (uint8 OpenCV, paws_cli/data/augment/color_ops_uint8.py) against the float definition.

The batched float ops (tests/test_gpu_colour_stats.py ties them to torchvision) define each op; the uint8 path must
give the same views up to 8-bit rounding, and never be further from the definition than torchvision's PIL path,
the reference implementation's own pipeline, is on the same images and parameters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from test_gpu_colour_stats import photo_like, spec
from torchvision.transforms import functional as F1
from torchvision.transforms.v2 import functional as F2

from paws_cli.data.augment import color_ops
from paws_cli.data.augment import color_ops_uint8 as u8ops
from paws_cli.data.augment.views import ViewSpec, apply_colour_params, sample_colour_params
from paws_cli.data.backends.ffcv_loader import DeviceColour
from paws_cli.data.backends.folder import IMAGENET_MEAN, IMAGENET_STD


def images(n: int = 48, size: int = 40, seed: int = 4) -> tuple[torch.Tensor, np.ndarray]:
    """The same photo-like uint8 images as (n, 3, s, s) tensor and (n, s, s, 3) array."""
    x = (photo_like(n, size, seed=seed) * 255).round().to(torch.uint8)
    return x, x.permute(0, 2, 3, 1).contiguous().numpy()


def as_nchw(views: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(views)).permute(0, 3, 1, 2).float()


def factors(n: int, low: float, high: float, seed: int = 5) -> list[float]:
    return (low + (high - low) * torch.rand(n, generator=torch.Generator().manual_seed(seed))).tolist()


@pytest.mark.parametrize(
    ("ours", "float_op", "levels"),
    [
        (u8ops.adjust_brightness, color_ops.adjust_brightness, 0.5),
        (u8ops.adjust_contrast, color_ops.adjust_contrast, 0.52),
        # OpenCV's luma is rounded to whole levels before the blend: half a level times |1 - factor| more.
        (u8ops.adjust_saturation, color_ops.adjust_saturation, 0.9),
    ],
)
def test_blend_ops_round_the_float_definition(ours, float_op, levels: float) -> None:
    x, nhwc = images()
    f = factors(x.shape[0], 0.2, 1.8)
    mine = torch.stack([as_nchw(ours(nhwc[i], f[i])[None])[0] for i in range(x.shape[0])])
    exact = float_op(x.float() / 255.0, torch.tensor(f)) * 255.0
    assert (mine - exact).abs().max() <= levels
    assert not torch.equal(mine, x.float())  # the factors did something


def test_grayscale_and_blur_within_rounding_of_the_float_definition() -> None:
    x, nhwc = images()
    gray = as_nchw(np.stack([u8ops._to_gray3(v) for v in nhwc]))
    assert (gray - color_ops.rgb_to_grayscale(x.float() / 255.0) * 255.0).abs().max() <= 0.55
    sigma = factors(x.shape[0], 0.1, 2.0)
    for kernel in (3, 5, 11, 23):
        mine = as_nchw(
            np.stack([u8ops.gaussian_blur(v, s, kernel) for v, s in zip(nhwc, sigma, strict=True)])
        )
        exact = color_ops.gaussian_blur(x.float() / 255.0, torch.tensor(sigma), kernel) * 255.0
        # Float taps and accumulation, one rounding at the end: within half a level of the definition.
        assert (mine - exact).abs().max() <= 0.501
    with pytest.raises(ValueError, match="blur kernel size 81 is too large for 40x40"):
        u8ops.gaussian_blur(nhwc[0], 1.0, 81)


def test_hue_rotates_primaries_exactly() -> None:
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    # 8-bit HSV: 256 hue levels per turn (2/3 of a turn falls between two, 1/768 turn off) and OpenCV's
    # integer HSV -> RGB, so a rotated primary lands within a few levels of the exact colour.
    for turns, rgb in ((1 / 3, (0, 255, 0)), (-1 / 3, (0, 0, 255)), (0.5, (0, 255, 255)), (0.0, (255, 0, 0))):
        rotated = u8ops.adjust_hue(red, turns).astype(int)
        assert np.abs(rotated - np.array(rgb)).max() <= 6, (turns, rotated[0, 0])
    gray = np.full((4, 4, 3), 77, np.uint8)
    assert (u8ops.adjust_hue(gray, 0.3) == gray).all()  # no hue to rotate
    with pytest.raises(ValueError, match="hue factors must lie in"):
        u8ops.adjust_hue(red, 0.6)


def test_hue_is_closer_to_the_float_definition_than_pils() -> None:
    x, nhwc = images()
    f = factors(x.shape[0], -0.2, 0.2)
    exact = color_ops.adjust_hue(x.float() / 255.0, torch.tensor(f)) * 255.0
    mine = as_nchw(np.stack([u8ops.adjust_hue(v, h) for v, h in zip(nhwc, f, strict=True)]))
    pil = as_nchw(
        np.stack([np.asarray(F1.adjust_hue(Image.fromarray(v), h)) for v, h in zip(nhwc, f, strict=True)])
    )
    ours_err, pil_err = (mine - exact).abs(), (pil - exact).abs()
    assert ours_err.mean() <= pil_err.mean() and ours_err.max() <= pil_err.max()
    assert ours_err.mean() < 0.6  # 8-bit HSV: a fraction of a level on average


def test_solarize_and_equalize_are_exact() -> None:
    x, nhwc = images(16, 20)
    view = dataclasses.replace(spec(), size=20, solarize_p=1.0, equalize_p=0.0)
    params = sample_colour_params(16, view, torch.Generator().manual_seed(0))
    assert torch.equal(
        as_nchw(u8ops.apply_colour_params_uint8(nhwc, params, view)), F2.solarize(x, 128).float()
    )
    view = dataclasses.replace(spec(), size=20, equalize_p=1.0)
    params = sample_colour_params(16, view, torch.Generator().manual_seed(0))
    assert torch.equal(as_nchw(u8ops.apply_colour_params_uint8(nhwc, params, view)), F2.equalize(x).float())


def pil_pipeline(view_u8: np.ndarray, params, i: int, view: ViewSpec) -> np.ndarray:
    """Row ``i`` of ``params`` with torchvision's PIL ops, as the reference's DataLoader workers apply them."""
    image = Image.fromarray(view_u8)
    if params.jitter[i]:
        ops = (F1.adjust_brightness, F1.adjust_contrast, F1.adjust_saturation, F1.adjust_hue)
        for code in params.jitter_order[i].tolist():
            image = ops[code](image, float(params.factors[i, code]))
    if params.grayscale[i]:
        image = F1.rgb_to_grayscale(image, 3)
    if params.blur[i]:
        k = view.blur_kernel_size
        image = F1.gaussian_blur(image, [k, k], [float(params.sigma[i])] * 2)
    if params.solarize[i]:
        image = F1.solarize(image, 128)
    return np.asarray(image)


def test_whole_pipeline_follows_the_float_path_closer_than_the_pil_pipeline() -> None:
    view = dataclasses.replace(spec(jitter_p=0.8, grayscale_p=0.3, blur_p=0.5), size=40, solarize_p=0.3)
    x, nhwc = images(64, 40)
    before = nhwc.copy()
    params = sample_colour_params(64, view, torch.Generator().manual_seed(9))
    exact = apply_colour_params(x.float() / 255.0, params, view) * 255.0
    mine = as_nchw(u8ops.apply_colour_params_uint8(nhwc, params, view))
    pil = as_nchw(np.stack([pil_pipeline(nhwc[i], params, i, view) for i in range(64)]))
    ours_err, pil_err = (mine - exact).abs(), (pil - exact).abs()
    assert ours_err.mean() <= pil_err.mean() and ours_err.max() <= pil_err.max()
    assert ours_err.mean() < 1.0 and (ours_err > 3).float().mean() < 0.05
    assert np.array_equal(nhwc, before)  # the input rows are left as they were
    with pytest.raises(ValueError, match="64 views but parameters for 3"):
        u8ops.apply_colour_params_uint8(nhwc, sample_colour_params(3, view, torch.Generator()), view)
    with pytest.raises(ValueError, match="expected uint8 RGB views"):
        u8ops.apply_colour_params_uint8(nhwc.astype(np.float32), params, view)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalizer_matches_float64(channels_last: bool) -> None:
    _, nhwc = images(6, 24)
    out = u8ops.Normalizer(IMAGENET_MEAN, IMAGENET_STD, channels_last)(nhwc)
    x = torch.from_numpy(nhwc).permute(0, 3, 1, 2).double() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), (x - mean) / std, atol=1e-5, rtol=0)
    assert out.dtype == torch.float32 and out.shape == (6, 3, 24, 24)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_colour_on_the_cpu_uses_the_uint8_ops_with_the_same_draws(channels_last: bool) -> None:
    view = dataclasses.replace(spec(jitter_p=0.8, grayscale_p=0.2, blur_p=0.5), size=24)
    _, nhwc = images(12, 24)
    stage = DeviceColour(view, torch.device("cpu"), channels_last)  # ops="auto"
    out = stage(torch.from_numpy(nhwc), torch.Generator().manual_seed(13))
    params = sample_colour_params(12, view, torch.Generator().manual_seed(13))
    expected = u8ops.Normalizer(IMAGENET_MEAN, IMAGENET_STD, channels_last)(
        u8ops.apply_colour_params_uint8(nhwc, params, view)
    )
    assert torch.equal(out, expected)
    tensor_path = DeviceColour(view, torch.device("cpu"), channels_last, ops="tensor")
    other = tensor_path(torch.from_numpy(nhwc), torch.Generator().manual_seed(13))
    # Same draws, other precision: a few levels apart at most (one level is ~0.017 after normalisation).
    assert (out - other).abs().mean() < 0.02


def test_opencv_colour_ops_refuse_an_accelerator() -> None:
    with pytest.raises(
        ValueError, match=r"data\.ffcv_colour_ops=opencv runs on the CPU, but run\.device is cuda"
    ):
        DeviceColour(spec(), torch.device("cuda"), False, ops="opencv")
    with pytest.raises(ValueError, match="must be auto, tensor or opencv"):
        DeviceColour(spec(), torch.device("cpu"), False, ops="pil")
