"""Batched photometric ops with one parameter per sample, matching torchvision's functional definitions.

Every function takes a float batch ``(n, C, H, W)`` with values in [0, 1] (C is 1 or 3) and, where the op
has a parameter, a float tensor ``(n,)`` holding each sample's value. They run as plain tensor ops on the
batch's device, so a whole batch of differently-parameterised images costs a handful of kernel launches.
Outputs are clamped to [0, 1] exactly where torchvision clamps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601 luma weights, the ones torchvision's rgb_to_grayscale uses.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def _per_sample(values: Tensor, images: Tensor) -> Tensor:
    """Reshape a ``(n,)`` parameter to ``(n, 1, 1, 1)`` on the images' device and dtype for broadcasting."""
    if values.dim() != 1 or values.shape[0] != images.shape[0]:
        raise ValueError(
            f"per-sample parameter has shape {tuple(values.shape)}; expected ({images.shape[0]},), "
            "one value per image of the batch"
        )
    return values.to(device=images.device, dtype=images.dtype, non_blocking=True).view(-1, 1, 1, 1)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """``factor * images + (1 - factor) * other`` clamped to [0, 1], torchvision's blend for float images."""
    f = _per_sample(factor, images)
    return (f * images + (1.0 - f) * other).clamp_(0.0, 1.0)


def gray(images: Tensor) -> Tensor:
    """Luma ``(n, 1, H, W)`` of an RGB batch (a 1-channel batch is returned unchanged)."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Grayscale with the input's channel count kept (3 identical channels for RGB), as RandomGrayscale."""
    return gray(images).expand_as(images).contiguous()


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Scale intensities by each sample's factor (blend with black)."""
    return (images * _per_sample(factor, images)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each sample with the mean of its own luma image (the channel mean for 1-channel images)."""
    mean = gray(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each sample with its luma image; an identity on 1-channel images (they carry no colour)."""
    if images.shape[1] == 1:
        return images
    return _blend(images, gray(images), factor)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate each sample's HSV hue by its factor (in turns, within [-0.5, 0.5]); identity on 1 channel.

    Equivalent to torchvision's RGB -> HSV -> shift -> RGB round trip, written directly in RGB: a hue
    rotation keeps each pixel's channel max and min, and channel c becomes
    ``max - (max - min) * clamp(min(k_c, 4 - k_c), 0, 1)`` with ``k_c = (n_c + 6 h) mod 6`` and
    n = 5, 3, 1 for red, green, blue (the closed form of HSV -> RGB), which never needs the saturation.
    """
    if images.shape[1] == 1:
        return images
    largest = float(factor.abs().max()) if factor.numel() else 0.0
    if largest > 0.5:
        raise ValueError(f"hue factors must lie in [-0.5, 0.5], got a factor of magnitude {largest}")
    r, g, b = images.unbind(dim=1)
    high = torch.maximum(torch.maximum(r, g), b)
    delta = high - torch.minimum(torch.minimum(r, g), b)
    # HSV hue in sectors [0, 6): chosen by the channel holding the maximum, red before green before blue.
    not_red = torch.where(high == g, b - r + 2.0 * delta, r - g + 4.0 * delta)
    numerator = torch.where(high == r, g - b, not_red)
    # A gray pixel has numerator g - b = 0 exactly, so any positive denominator gives it hue 0.
    hue6 = numerator / delta.clamp(min=torch.finfo(delta.dtype).tiny)
    hue6 = torch.remainder(hue6 + 6.0 * _per_sample(factor, images)[:, 0], 6.0)
    offsets = torch.tensor((5.0, 3.0, 1.0), device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = hue6.unsqueeze(1) + offsets
    k = torch.where(k >= 6.0, k - 6.0, k)  # k < 12, so one wrap is enough
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (high.unsqueeze(1) - delta.unsqueeze(1) * ramp).clamp_(0.0, 1.0)


def blur_kernel_size(size: int, fraction: float) -> int:
    """Odd kernel size close to ``fraction * size``, at least 3 (SimCLR/BYOL's ~10% of the view)."""
    k = max(3, round(fraction * size))
    return k if k % 2 == 1 else k + 1


def gaussian_kernels1d(sigma: Tensor, kernel_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised 1-D Gaussian taps ``(n, kernel_size)`` centred on the middle tap, one row per sigma."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"Gaussian kernel size must be a positive odd integer, got {kernel_size}")
    offsets = torch.arange(kernel_size, device=sigma.device, dtype=dtype) - (kernel_size - 1) / 2.0
    logits = -0.5 * (offsets.unsqueeze(0) / sigma.to(dtype).unsqueeze(1)) ** 2
    taps = logits.exp()
    return taps / taps.sum(dim=1, keepdim=True)


def check_blur_fits(kernel_size: int, height: int, width: int) -> int:
    """The reflect padding of a ``kernel_size`` blur, or a clear error where the images are too small for it."""
    pad = kernel_size // 2
    if pad >= height or pad >= width:
        raise ValueError(
            f"blur kernel size {kernel_size} is too large for {height}x{width} images (reflect padding needs "
            "kernel_size // 2 < height and width); lower blur_kernel_frac"
        )
    return pad


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding, as torchvision's gaussian_blur.

    The 2-D kernel of torchvision is the outer product of two 1-D kernels, so a horizontal then a vertical
    grouped convolution (one group per sample and channel) gives the same result at a fraction of the cost.
    """
    n, c, h, w = images.shape
    pad = check_blur_fits(kernel_size, h, w)
    taps = gaussian_kernels1d(sigma.to(images.device, non_blocking=True), kernel_size, images.dtype)
    taps = taps.repeat_interleave(c, dim=0)  # (n * c, k): every channel of a sample shares its sigma
    x = images.reshape(1, n * c, h, w)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, taps.view(n * c, 1, 1, kernel_size), groups=n * c)
    x = F.conv2d(x, taps.view(n * c, 1, kernel_size, 1), groups=n * c)
    return x.view(n, c, h, w)


def solarize(images: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert every value at or above ``threshold``."""
    return torch.where(images >= threshold, 1.0 - images, images)


def equalize(images: Tensor) -> Tensor:
    """Histogram equalisation per sample and channel on 256 levels, torchvision's uint8 algorithm batched.

    Values are quantised to 8 bits first (round(x * 255)); the output holds multiples of 1/255.
    """
    n, c, h, w = images.shape
    levels = (images * 255.0).round_().clamp_(0, 255).to(torch.int64).reshape(n * c, h * w)
    rows = n * c
    # One bincount over all channels: offset each channel's levels into its own block of 256 bins.
    offsets = torch.arange(rows, device=images.device).unsqueeze(1) * 256
    hist = torch.bincount((levels + offsets).reshape(-1), minlength=rows * 256).view(rows, 256)
    # torchvision's step: pixels outside the highest occupied level, divided by 255 (floor).
    top_count = hist.gather(1, levels.max(dim=1, keepdim=True).values)
    step = torch.div(h * w - top_count, 255, rounding_mode="floor")
    safe_step = step.clamp(min=1)
    lut = torch.div(
        hist.cumsum(dim=1) + torch.div(step, 2, rounding_mode="floor"), safe_step, rounding_mode="floor"
    )
    # Level v maps through the cumulative count strictly below v, hence the shift by one bin.
    lut = torch.cat((torch.zeros_like(lut[:, :1]), lut[:, :-1]), dim=1).clamp_(0, 255)
    mapped = lut.gather(1, levels)
    # A channel with (almost) a single level has step 0 and is left as it is.
    mapped = torch.where(step == 0, levels, mapped)
    return (mapped.to(images.dtype) / 255.0).view(n, c, h, w)
