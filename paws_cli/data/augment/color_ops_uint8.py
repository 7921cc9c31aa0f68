"""The FFCV back end's colour ops on the CPU: per-view uint8 OpenCV calls driven by the batched path's draws.

Why a second implementation of :func:`paws_cli.data.augment.views.apply_colour_params`: on a CPU the batched float ops
cost about 10 ms per 224 px view (the hue rotation alone about 4 ms of float maths per pixel, the 23-tap blur
3.5 ms, the float conversion and normalisation 1 ms), more than decoding the image. OpenCV's SIMD uint8 kernels
do the same ops in about 0.7 ms. They work at 8-bit precision like the reference's PIL pipeline (torchvision's
PIL ops are uint8 too, and PIL's HSV also has 256 hue levels), so a view differs from the float path's by a few
levels at most (tests/test_color_ops_uint8.py bounds it). The random parameters are the same
:class:`~paws_cli.data.augment.views.ViewParams` rows, drawn by :func:`~paws_cli.data.augment.views.sample_colour_params`,
so the distribution of every factor is the batched path's (tested against torchvision's) by construction.

Per view, in the batched path's order: colour jitter (the row's own op order), grayscale, Gaussian blur,
solarize, equalize; then one normalisation pass for the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from paws_cli.data.augment import color_ops
from paws_cli.data.augment.views import ViewParams, ViewSpec

_IDENTITY = np.arange(256, dtype=np.uint8)
# Solarize at 0.5 on [0, 1]: level v has v / 255 >= 0.5 exactly when v >= 128.
_SOLARIZE_LUT = np.where(_IDENTITY >= 128, 255 - _IDENTITY, _IDENTITY).astype(np.uint8)


def _to_gray3(view: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(view, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def adjust_brightness(view: np.ndarray, factor: float) -> np.ndarray:
    """Scale by ``factor`` with rounding and saturation to 0..255."""
    return cv2.addWeighted(view, factor, view, 0.0, 0.0)


def adjust_contrast(view: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean of the view's luma (a float, as the batched path and torchvision's tensor op)."""
    mean = cv2.mean(cv2.cvtColor(view, cv2.COLOR_RGB2GRAY))[0]
    return cv2.addWeighted(view, factor, view, 0.0, (1.0 - factor) * mean)


def adjust_saturation(view: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the view's luma image."""
    return cv2.addWeighted(view, factor, _to_gray3(view), 1.0 - factor, 0.0)


def adjust_hue(view: np.ndarray, factor: float) -> np.ndarray:
    """Rotate the hue by ``factor`` turns in 8-bit HSV (256 hue levels per turn, as PIL's HSV)."""
    if not -0.5 <= factor <= 0.5:
        raise ValueError(f"hue factors must lie in [-0.5, 0.5], got {factor}")
    hsv = cv2.cvtColor(view, cv2.COLOR_RGB2HSV_FULL)
    shift = round(factor * 256) % 256
    # One table lookup shifts H (wrapping around the circle) and leaves S and V as they are.
    lut = np.stack((np.roll(_IDENTITY, -shift), _IDENTITY, _IDENTITY), axis=-1).reshape(1, 256, 3)
    return cv2.cvtColor(cv2.LUT(hsv, lut), cv2.COLOR_HSV2RGB_FULL)


def _blur(view: np.ndarray, taps: np.ndarray) -> np.ndarray:
    # sepFilter2D with float taps rather than cv2.GaussianBlur: the latter's bit-exact fixed-point path for
    # 8-bit images takes 0.98 ms for a 23-tap blur of a 224 px view, this 0.26 ms, with the same taps.
    return cv2.sepFilter2D(view, -1, taps, taps, borderType=cv2.BORDER_REFLECT_101)


def _blur_taps(sigma: Tensor, kernel_size: int) -> np.ndarray:
    """torchvision's 1-D taps (n, kernel_size) for each sigma, computed in float64 as the batched path does."""
    return color_ops.gaussian_kernels1d(sigma, kernel_size, torch.float64).to(torch.float32).numpy()


def gaussian_blur(view: np.ndarray, sigma: float, kernel_size: int) -> np.ndarray:
    """Separable Gaussian blur with torchvision's taps and reflect padding (OpenCV's BORDER_REFLECT_101)."""
    color_ops.check_blur_fits(kernel_size, view.shape[0], view.shape[1])
    return _blur(view, _blur_taps(torch.tensor([sigma]), kernel_size)[0])


def equalize(view: np.ndarray) -> np.ndarray:
    """torchvision's equalisation per channel, through the batched op (exact on 8-bit input; rare in recipes)."""
    x = torch.from_numpy(view).permute(2, 0, 1).unsqueeze(0).to(torch.float32).div_(255.0)
    levels = color_ops.equalize(x).mul_(255.0).round_().to(torch.uint8)
    return levels[0].permute(1, 2, 0).contiguous().numpy()


_JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def apply_colour_params_uint8(views: np.ndarray, params: ViewParams, spec: ViewSpec) -> np.ndarray:
    """The photometric part of each view (jitter, grayscale, blur, solarize, equalize) on uint8 RGB views.

    ``views``: uint8 (n, s, s, 3), one row per row of ``params`` (left unchanged); returns a new uint8 array.
    """
    if views.dtype != np.uint8 or views.ndim != 4 or views.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB views (n, s, s, 3), got {views.dtype} {views.shape}")
    if views.shape[0] != params.jitter.shape[0]:
        raise ValueError(f"{views.shape[0]} views but parameters for {params.jitter.shape[0]}")
    # Python scalars once for the whole batch: indexing tensors per view would cost more than the ops.
    jitter, order = params.jitter.tolist(), params.jitter_order.tolist()
    factors = params.factors.tolist()
    gray, blur = params.grayscale.tolist(), params.blur.tolist()
    solar, equal = params.solarize.tolist(), params.equalize.tolist()
    if any(blur):
        # All rows' taps in one call; rows that are not blurred never read theirs.
        color_ops.check_blur_fits(spec.blur_kernel_size, views.shape[1], views.shape[2])
        taps = _blur_taps(params.sigma, spec.blur_kernel_size)
    out = np.empty_like(views)
    for i in range(views.shape[0]):
        view = views[i]
        if jitter[i]:
            for code in order[i]:
                view = _JITTER[code](view, factors[i][code])
        if gray[i]:
            view = _to_gray3(view)
        if blur[i]:
            view = _blur(view, taps[i])
        if solar[i]:
            view = cv2.LUT(view, _SOLARIZE_LUT)
        if equal[i]:
            view = equalize(view)
        out[i] = view
    return out


class Normalizer:
    """uint8 NHWC views to normalised float32 NCHW tensors in one fused multiply-add pass.

    Why not ``(x.float() / 255 - mean) / std`` in torch: on one CPU core that costs about 1 ms per 224 px view
    (a contiguous NCHW copy after it another 0.4 ms), mostly in broadcasting over a channel axis of length 3.
    numpy's multiply-add with a float32 output does it in about 0.16 ms: for channels_last, each row of pixels
    against a row-long pattern of per-channel constants (the NHWC result is already an NCHW tensor in
    channels_last layout); for the contiguous layout, one channel plane at a time straight into NCHW.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool) -> None:
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need 3 values each, std positive")
        std64 = np.asarray(std, dtype=np.float64)
        self.scale = (1.0 / (255.0 * std64)).astype(np.float32)
        self.shift = (-np.asarray(mean, dtype=np.float64) / std64).astype(np.float32)
        self.channels_last = channels_last

    def __call__(self, views: np.ndarray) -> Tensor:
        n, h, w, c = views.shape
        if self.channels_last:
            rows = views.reshape(n * h, w * c)
            out = np.empty(rows.shape, dtype=np.float32)
            np.multiply(rows, np.tile(self.scale, w), out=out, dtype=np.float32)
            np.add(out, np.tile(self.shift, w), out=out)
            return torch.from_numpy(out).view(n, h, w, c).permute(0, 3, 1, 2)
        planes = np.empty((n, c, h, w), dtype=np.float32)
        for k in range(c):
            np.multiply(views[..., k], self.scale[k], out=planes[:, k], dtype=np.float32)
            np.add(planes[:, k], self.shift[k], out=planes[:, k])
        return torch.from_numpy(planes)
