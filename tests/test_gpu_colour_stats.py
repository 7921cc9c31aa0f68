"""The batched per-sample colour ops (what the FFCV back end runs on the training device) against torchvision's
per-image transforms.v2: the laws of the drawn parameters (jitter factors, op order, grayscale and blur rates, blur
sigma) and, given the same parameters, the same pixels as torchvision's functional ops on each image. Runs on the
CPU, and on CUDA as well where there is a GPU (every op is also compared between the two devices).

tests/test_augment.py checks the ops one by one against torchvision's v1 functional API; this file adds the
sampling laws against the v2 transforms' own draws and the whole photometric pipeline of the device path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F2

from paws_cli.data.augment import color_ops
from paws_cli.data.augment.views import ViewSpec, apply_colour_params, sample_colour_params
from paws_cli.data.backends.ffcv_loader import DeviceColour
from paws_cli.data.backends.folder import IMAGENET_MEAN, IMAGENET_STD

stats = pytest.importorskip("scipy.stats")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N = 20000  # parameter draws per law
P_MIN = 1e-3  # tests of laws fail below this p-value (a correct sampler fails one test in 1000)


@pytest.fixture(autouse=True)
def seeded_global_rng() -> Iterator[None]:
    """torchvision's transforms draw from torch's global RNG: seed it per test (and restore it after)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def photo_like(n: int, size: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """Smooth colour fields with grain, some gray and saturated pixels: float (n, 3, s, s) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(
        torch.rand(n, 3, 5, 5, generator=g), size=(size, size), mode="bicubic", align_corners=False
    )
    x = (x + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    x[:, :, :2, :2] = x[:, :1, :2, :2]  # gray pixels: hue undefined
    x[:, 0, -2:, -2:], x[:, 1:, -2:, -2:] = 1.0, 0.0  # pure red
    return x.to(device)


def spec(strength: float = 1.0, **probabilities: float) -> ViewSpec:
    """A 16 px view kind; every probability 0 unless given."""
    base = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0)
    return ViewSpec(16, (0.3, 1.0), jitter_strength=strength, **(base | probabilities))


def draws(view: ViewSpec, n: int = N, seed: int = 0, device: str = "cpu"):
    generator = torch.Generator(device=device).manual_seed(seed)
    return sample_colour_params(n, view, generator)


def binomial_ok(flags: torch.Tensor, p: float) -> bool:
    return stats.binomtest(int(flags.sum()), flags.numel(), p).pvalue > P_MIN


# ----------------------------------------------------------------------------------------------- sampling laws


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_jitter_factors_follow_colorjitters_law(strength: float) -> None:
    params = draws(spec(strength, jitter_p=0.8))
    reference = v2.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
    theirs = [reference.make_params([torch.zeros(3, 2, 2)]) for _ in range(4000)]
    names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    for k, name in enumerate(names):
        ours = params.factors[:, k].double().numpy()
        lo, hi = (-0.2 * strength, 0.2 * strength) if k == 3 else (1 - 0.8 * strength, 1 + 0.8 * strength)
        assert ours.min() >= lo - 1e-6 and ours.max() <= hi + 1e-6, name
        assert stats.kstest(ours, "uniform", args=(lo, hi - lo)).pvalue > P_MIN, name  # U(lo, hi)
        assert stats.ks_2samp(ours, [t[name] for t in theirs]).pvalue > P_MIN, name  # torchvision's draws
    assert binomial_ok(params.jitter, 0.8)


def test_jitter_op_order_is_a_uniform_permutation_like_torchvisions() -> None:
    params = draws(spec(jitter_p=1.0))
    codes = (params.jitter_order * torch.tensor([64, 16, 4, 1])).sum(1)  # one code per permutation
    counts = torch.bincount(codes, minlength=256)
    observed = counts[counts > 0]
    assert len(observed) == 24  # every permutation of the 4 ops, and only permutations
    assert stats.chisquare(observed.numpy()).pvalue > P_MIN
    reference = v2.ColorJitter(0.8, 0.8, 0.8, 0.2)
    theirs = torch.stack([reference.make_params([torch.zeros(3, 2, 2)])["fn_idx"] for _ in range(4000)])
    for step in range(4):  # the op at each step: ours and torchvision's are alike (4 x 2 table)
        table = torch.stack(
            [
                torch.bincount(params.jitter_order[:, step], minlength=4),
                torch.bincount(theirs[:, step], minlength=4),
            ]
        )
        assert stats.chi2_contingency(table.numpy()).pvalue > P_MIN, step


def test_grayscale_rate_matches_randomgrayscale() -> None:
    params = draws(spec(grayscale_p=0.2))
    assert binomial_ok(params.grayscale, 0.2)
    reference = v2.RandomGrayscale(0.2)
    image = photo_like(1, 4, seed=1)[0]
    theirs = torch.tensor([bool(torch.equal(*reference(image)[:2])) for _ in range(4000)])  # gray: r == g
    assert binomial_ok(theirs, 0.2)
    # The two rates agree (two-proportion z-test).
    p1, p2 = params.grayscale.double().mean().item(), theirs.double().mean().item()
    pooled = (p1 * N + p2 * 4000) / (N + 4000)
    assert abs(p1 - p2) <= 4 * math.sqrt(pooled * (1 - pooled) * (1 / N + 1 / 4000))


def test_blur_sigma_range_and_law_match_gaussianblur() -> None:
    view = spec(blur_p=0.5)
    params = draws(view)
    sigma = params.sigma.double().numpy()
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    assert sigma.min() < 0.11 and sigma.max() > 1.99  # the whole range is used
    assert stats.kstest(sigma, "uniform", args=(0.1, 1.9)).pvalue > P_MIN
    reference = v2.GaussianBlur(view.blur_kernel_size, sigma=(0.1, 2.0))
    theirs = [reference.make_params([torch.zeros(3, 2, 2)])["sigma"][0] for _ in range(4000)]
    assert stats.ks_2samp(sigma, theirs).pvalue > P_MIN
    assert binomial_ok(params.blur, 0.5)


def test_draws_are_independent_across_rows_and_parameters() -> None:
    params = draws(spec(jitter_p=0.8, grayscale_p=0.2, blur_p=0.5))
    columns = torch.stack(
        [
            params.factors[:, 0],
            params.factors[:, 3],
            params.sigma,
            params.grayscale.float(),
            params.blur.float(),
        ]
    ).double()
    correlation = torch.corrcoef(columns)
    off_diagonal = correlation - torch.diag(torch.diag(correlation))
    assert off_diagonal.abs().max() < 5 / math.sqrt(N)
    lagged = torch.corrcoef(torch.stack([params.sigma[:-1], params.sigma[1:]]).double())[0, 1]
    assert abs(lagged) < 5 / math.sqrt(N)  # neighbouring rows (samples, views) are unrelated


# ----------------------------------------------------------------------------------------------- same pixels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("ours", "theirs", "low", "high"),
    [
        (color_ops.adjust_brightness, F2.adjust_brightness, 0.2, 1.8),
        (color_ops.adjust_contrast, F2.adjust_contrast, 0.2, 1.8),
        (color_ops.adjust_saturation, F2.adjust_saturation, 0.2, 1.8),
        (color_ops.adjust_hue, F2.adjust_hue, -0.5, 0.5),
    ],
)
def test_jitter_ops_equal_v2_functional_per_image(ours, theirs, low: float, high: float, device: str) -> None:
    x = photo_like(32, 20, seed=2, device=device)
    factors = low + (high - low) * torch.rand(32, generator=torch.Generator().manual_seed(3))
    factors[0], factors[1] = low, high
    reference = torch.stack([theirs(x[i], float(factors[i])) for i in range(32)])
    torch.testing.assert_close(ours(x.clone(), factors), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("ours", "theirs", "levels"),
    [
        (color_ops.adjust_brightness, F2.adjust_brightness, 1),
        (color_ops.adjust_contrast, F2.adjust_contrast, 1),
        # torchvision's uint8 saturation truncates its gray image to whole levels before blending: one more.
        (color_ops.adjust_saturation, F2.adjust_saturation, 2),
        (color_ops.adjust_hue, F2.adjust_hue, 1),
    ],
)
def test_jitter_ops_on_uint8_within_a_level(ours, theirs, levels: int) -> None:
    u8 = (photo_like(32, 20, seed=4) * 255).round().to(torch.uint8)
    factors = 0.25 + 1.5 * torch.rand(32, generator=torch.Generator().manual_seed(5))
    if theirs is F2.adjust_hue:
        factors = factors / 4 - 0.25
    reference = torch.stack([theirs(u8[i], float(factors[i])) for i in range(32)]).float()
    mine = (ours(u8.float() / 255.0, factors) * 255.0).round()
    assert (mine - reference).abs().max() <= levels


@pytest.mark.parametrize("device", DEVICES)
def test_grayscale_and_blur_equal_v2_functional(device: str) -> None:
    x = photo_like(16, 24, seed=6, device=device)
    torch.testing.assert_close(
        color_ops.rgb_to_grayscale(x), F2.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0
    )
    sigma = 0.1 + 1.9 * torch.rand(16, generator=torch.Generator().manual_seed(7))
    for kernel in (3, 11):
        reference = torch.stack(
            [F2.gaussian_blur(x[i], [kernel, kernel], [float(sigma[i])] * 2) for i in range(16)]
        )
        torch.testing.assert_close(color_ops.gaussian_blur(x, sigma, kernel), reference, atol=1e-5, rtol=0)


def v2_pipeline(image: torch.Tensor, params, i: int, view: ViewSpec) -> torch.Tensor:
    """Row ``i`` of ``params`` applied to one image with torchvision's v2 functional ops, in the spec's order."""
    if params.jitter[i]:
        ops = (F2.adjust_brightness, F2.adjust_contrast, F2.adjust_saturation, F2.adjust_hue)
        for code in params.jitter_order[i].tolist():
            image = ops[code](image, float(params.factors[i, code]))
    if params.grayscale[i]:
        image = F2.rgb_to_grayscale(image, num_output_channels=3)
    if params.blur[i]:
        k = view.blur_kernel_size
        image = F2.gaussian_blur(image, [k, k], [float(params.sigma[i])] * 2)
    if params.solarize[i]:
        image = F2.solarize(image, 0.5)
    return image


@pytest.mark.parametrize("device", DEVICES)
def test_whole_colour_pipeline_equals_v2_per_image(device: str) -> None:
    view = dataclasses.replace(spec(jitter_p=0.8, grayscale_p=0.3, blur_p=0.5), size=24, solarize_p=0.3)
    x = photo_like(96, 24, seed=8, device=device)
    params = draws(view, n=96, seed=9, device=device)
    out = apply_colour_params(x.clone(), params, view)
    for i in range(96):
        torch.testing.assert_close(out[i], v2_pipeline(x[i], params, i, view), atol=1e-5, rtol=0)
    assert 0 < int(params.jitter.sum()) < 96 and 0 < int(params.blur.sum()) < 96


@pytest.mark.parametrize("device", DEVICES)
def test_equalize_equals_v2_functional_on_8_bit_images(device: str) -> None:
    # Equalize works on 256 levels; on images that are whole levels it matches torchvision's exactly (after
    # float ops, a value within rounding error of a half level may land on the other level, and the lookup
    # table can then move it by several levels: a property of equalize, not of the implementation).
    u8 = (photo_like(16, 20, seed=14) * 255).round().to(torch.uint8)
    u8[0, 1] = 77  # a single level: left as it is
    mine = color_ops.equalize(u8.to(device).float() / 255.0)
    assert torch.equal((mine * 255).round().to(torch.uint8).cpu(), F2.equalize(u8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_cpu_give_the_same_views() -> None:
    view = dataclasses.replace(spec(jitter_p=0.8, grayscale_p=0.3, blur_p=0.5), size=24)
    x = photo_like(64, 24, seed=10)
    params = draws(view, n=64, seed=11)
    cpu = apply_colour_params(x.clone(), params, view)
    gpu = apply_colour_params(x.cuda(), params, view).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- the device stage


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_device_colour_stage_is_the_colour_ops_then_imagenet_normalisation(
    device: str, channels_last: bool
) -> None:
    view = dataclasses.replace(spec(jitter_p=0.8, grayscale_p=0.2, blur_p=0.5), size=24)
    u8 = (photo_like(12, 24, seed=12) * 255).round().to(torch.uint8)
    nhwc = u8.permute(0, 2, 3, 1).contiguous().to(device)  # what the decoder delivers
    stage = DeviceColour(view, torch.device(device), channels_last, ops="tensor")
    out = stage(nhwc, torch.Generator(device=device).manual_seed(13))
    params = sample_colour_params(12, view, torch.Generator(device=device).manual_seed(13))
    expected = apply_colour_params(u8.to(device).float() / 255.0, params, view)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (expected - mean) / std, atol=1e-5, rtol=1e-5)
    assert out.dtype == torch.float32 and out.device.type == device
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)
