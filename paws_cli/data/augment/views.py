"""Batched multi-crop view generation for PAWS with independent random parameters per sample and per view.

All views of a batch are made with tensor ops on the batch's device: random-resized crops for every
(view, sample) pair in one ``roi_align`` call, then flips and photometric ops applied to the samples that
drew them. Randomness comes only from an explicit ``torch.Generator``: parameters are drawn first
(:func:`sample_view_params`) and applied second (:func:`apply_view_params`), so a seed fixes every view.

Per view the order follows the reference pipeline: crop, flip, colour jitter (random op order per sample),
grayscale, Gaussian blur, solarize, equalize, then normalisation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from paws_cli.config.schema import AugmentSettings
from paws_cli.data.augment import color_ops

_TRIES = 10  # torchvision's RandomResizedCrop attempts before its central-crop fallback


def _check_range(name: str, pair: Sequence[float], low: float, high: float) -> None:
    if len(pair) != 2 or not (low <= pair[0] <= pair[1] <= high):
        raise ValueError(f"ViewSpec.{name} must be (min, max) with {low} <= min <= max <= {high}, got {pair}")


@dataclass(frozen=True)
class ViewSpec:
    """Augmentation recipe of one kind of view (e.g. PAWS' 224 px large or 96 px small crops)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter_strength: float = 1.0
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    solarize_p: float = 0.0
    equalize_p: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 2:
            raise ValueError(f"ViewSpec.size must be an integer >= 2 (output pixels), got {self.size!r}")
        _check_range("scale", self.scale, 1e-12, 1.0)
        _check_range("ratio", self.ratio, 1e-12, math.inf)
        _check_range("blur_sigma", self.blur_sigma, 1e-12, math.inf)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "equalize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ViewSpec.{name} is a probability in [0, 1], got {getattr(self, name)}")
        # Hue factors are drawn from [-0.2 s, 0.2 s] and torchvision only defines hue shifts up to 0.5.
        if not 0.0 <= self.jitter_strength <= 2.5:
            raise ValueError(f"ViewSpec.jitter_strength must be in [0, 2.5], got {self.jitter_strength}")
        if not 0.0 < self.blur_kernel_frac <= 1.0:
            raise ValueError(f"ViewSpec.blur_kernel_frac must be in (0, 1], got {self.blur_kernel_frac}")

    @property
    def blur_kernel_size(self) -> int:
        """Odd Gaussian kernel size used for this view size."""
        return color_ops.blur_kernel_size(self.size, self.blur_kernel_frac)

    def jitter_ranges(self) -> tuple[tuple[float, float], ...]:
        """(brightness, contrast, saturation, hue) factor ranges as torchvision's ColorJitter builds them."""
        s = self.jitter_strength
        blend = (max(0.0, 1.0 - 0.8 * s), 1.0 + 0.8 * s)
        return blend, blend, blend, (-0.2 * s, 0.2 * s)


@dataclass(frozen=True)
class ViewParams:
    """Random draws for n crops (CPU tensors, one row per crop). Jitter op codes: 0 b, 1 c, 2 s, 3 h."""

    source: Tensor  # (n,) int64 index of the image each crop is taken from
    boxes: Tensor  # (n, 4) float32 (x0, y0, x1, y1) in pixel-edge coordinates
    flip: Tensor  # (n,) bool
    jitter: Tensor  # (n,) bool
    jitter_order: Tensor  # (n, 4) int64, the op applied at each of the 4 steps
    factors: Tensor  # (n, 4) float32 brightness, contrast, saturation, hue factors
    grayscale: Tensor  # (n,) bool
    blur: Tensor  # (n,) bool
    sigma: Tensor  # (n,) float32
    solarize: Tensor  # (n,) bool
    equalize: Tensor  # (n,) bool


def _uniform(generator: torch.Generator, *shape: int) -> Tensor:
    """U[0, 1) float64 draws from ``generator`` on its own device, returned on the CPU."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).cpu()


def random_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """Draw n crop boxes (x0, y0, x1, y1) with torchvision's RandomResizedCrop.get_params semantics.

    Each sample gets its own 10 attempts (area fraction ~ U(scale), log aspect ~ U(log ratio), rounded
    width/height that must fit); the first fitting attempt wins, and samples with none fall back to the
    central crop with the aspect ratio clamped to ``ratio``. Returns float32 (n, 4) on the CPU.
    """
    if height < 1 or width < 1:
        raise ValueError(f"cannot crop an image of size {height}x{width}")
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"scale {scale} and ratio {ratio} must be positive (min, max) pairs")
    u = _uniform(generator, n, 2 * _TRIES + 2)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :_TRIES])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _TRIES : 2 * _TRIES])
    # torch.round rounds half to even, like Python's round() in torchvision.
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # argmax returns the first maximal index
    found = fits.any(dim=1)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w = torch.where(found, w.gather(1, first).squeeze(1), torch.full((n,), float(fw), dtype=torch.float64))
    h = torch.where(found, h.gather(1, first).squeeze(1), torch.full((n,), float(fh), dtype=torch.float64))
    # Offsets uniform on {0, ..., H - h} (floor of a scaled uniform), central for the fallback.
    top = torch.where(found, torch.floor(u[:, -2] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(u[:, -1] * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack((left, top, left + w, top + h), dim=1).to(torch.float32)


def crop_resize(images: Tensor, boxes: Tensor, size: int, index: Tensor | None = None) -> Tensor:
    """Crop every box and resize it to ``size`` x ``size`` with bilinear ``roi_align(aligned=True)``.

    ``images`` is float (N, C, H, W); box k is cut from image ``index[k]`` (default k). Sampling ratio 0
    lets roi_align use ceil(box / size) samples per output pixel, so downscaling averages the covered
    pixels while a same-size box samples pixel centres exactly (an identity).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"crop_resize needs a float (N, C, H, W) batch, got {images.dtype} {tuple(images.shape)}"
        )
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4) (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    if index is None:
        if boxes.shape[0] != images.shape[0]:
            raise ValueError(f"{boxes.shape[0]} boxes for {images.shape[0]} images: pass index= for each box")
        index = torch.arange(boxes.shape[0])
    rois = torch.cat((index.to(boxes.device, boxes.dtype).unsqueeze(1), boxes), dim=1)
    rois = rois.to(images.device, images.dtype, non_blocking=True)
    return roi_align(images, rois, output_size=(size, size), sampling_ratio=0, aligned=True)


def sample_view_params(
    num_images: int, height: int, width: int, spec: ViewSpec, count: int, generator: torch.Generator
) -> ViewParams:
    """Draw parameters for ``count`` views of each of ``num_images`` images (row v * num_images + i).

    Every row gets independent draws. Row counts of random numbers do not depend on the probabilities,
    so changing one probability does not reshuffle the other draws of a seed.
    """
    if num_images < 1 or count < 1:
        raise ValueError(f"need at least one image and one view, got num_images={num_images}, count={count}")
    n = num_images * count
    boxes = random_resized_crop_boxes(n, height, width, spec.scale, spec.ratio, generator)
    return _params_from_uniforms(torch.arange(n) % num_images, boxes, _uniform(generator, n, 15), spec)


def sample_colour_params(n: int, spec: ViewSpec, generator: torch.Generator) -> ViewParams:
    """Draw only the photometric parameters of ``n`` views whose crops and flips were made elsewhere.

    For views cropped and flipped before they reach the device (the FFCV back end's decoder): ``source`` is
    ``arange(n)`` and ``boxes``/``flip`` are placeholders (full zeros, all False) that :func:`apply_colour_params`
    never reads. The draws of one row follow the same law as in :func:`sample_view_params`.
    """
    if n < 1:
        raise ValueError(f"need at least one view, got n={n}")
    params = _params_from_uniforms(torch.arange(n), torch.zeros(n, 4), _uniform(generator, n, 15), spec)
    return dataclasses.replace(params, flip=torch.zeros(n, dtype=torch.bool))


def _params_from_uniforms(source: Tensor, boxes: Tensor, u: Tensor, spec: ViewSpec) -> ViewParams:
    """Turn 15 U[0, 1) draws per row into the row's flip/jitter/grayscale/blur/solarize/equalize parameters."""
    ranges = torch.tensor(spec.jitter_ranges(), dtype=torch.float64)  # (4, 2)
    factors = ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * u[:, 0:4]
    sig_lo, sig_hi = spec.blur_sigma
    return ViewParams(
        source=source,
        boxes=boxes,
        flip=u[:, 4] < spec.flip_p,
        jitter=u[:, 5] < spec.jitter_p,
        # argsort of 4 i.i.d. uniforms is a uniformly random permutation, like torch.randperm(4) per sample
        jitter_order=torch.argsort(u[:, 6:10], dim=1),
        factors=factors.to(torch.float32),
        grayscale=u[:, 10] < spec.grayscale_p,
        blur=u[:, 11] < spec.blur_p,
        sigma=(sig_lo + (sig_hi - sig_lo) * u[:, 12]).to(torch.float32),
        solarize=u[:, 13] < spec.solarize_p,
        equalize=u[:, 14] < spec.equalize_p,
    )


def _apply_where(images: Tensor, selected: Tensor, op: Callable[..., Tensor], *per_sample: Tensor) -> Tensor:
    """Apply ``op`` (with the matching rows of ``per_sample``) to the rows flagged in CPU mask ``selected``.

    Only the selected rows are computed; ``images`` is updated in place (callers own it).
    """
    rows = selected.nonzero().squeeze(1)
    if rows.numel() == 0:
        return images
    if rows.numel() == images.shape[0]:
        return op(images, *per_sample)
    # The mask lives on the CPU, so choosing rows never waits on the accelerator; the small index goes over
    # with a non-blocking copy (pageable memory is staged at once, so the CPU tensor may be freed after).
    device_rows = rows.to(images.device, non_blocking=True)
    images[device_rows] = op(images[device_rows], *(p[rows] for p in per_sample))
    return images


def _color_jitter(images: Tensor, params: ViewParams) -> Tensor:
    """ColorJitter with each sample's own op order and factors; saturation and hue skipped for 1 channel."""
    ops: list[Callable[[Tensor, Tensor], Tensor]] = [
        color_ops.adjust_brightness,
        color_ops.adjust_contrast,
        color_ops.adjust_saturation,
        color_ops.adjust_hue,
    ]
    active = 2 if images.shape[1] == 1 else 4
    for step in range(4):
        for code in range(active):
            chosen = params.jitter & (params.jitter_order[:, step] == code)
            images = _apply_where(images, chosen, ops[code], params.factors[:, code])
    return images


def apply_view_params(images: Tensor, params: ViewParams, spec: ViewSpec) -> Tensor:
    """Render the views described by ``params`` from float images (N, C, H, W) in [0, 1]; output in [0, 1]."""
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    views = crop_resize(images, params.boxes, spec.size, params.source)
    views = _apply_where(views, params.flip, lambda x: x.flip(-1))
    return apply_colour_params(views, params, spec)


def apply_colour_params(views: Tensor, params: ViewParams, spec: ViewSpec) -> Tensor:
    """The photometric part of a view: colour jitter, grayscale, blur, solarize, equalize (no crop or flip).

    ``views`` is float (n, C, s, s) in [0, 1] with one row per row of ``params``; rows may be updated in place.
    """
    channels = views.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"views must have 1 or 3 channels, got {channels}")
    if views.shape[0] != params.jitter.shape[0]:
        raise ValueError(f"{views.shape[0]} views but parameters for {params.jitter.shape[0]}")
    views = _color_jitter(views, params)
    if channels == 3:
        views = _apply_where(views, params.grayscale, color_ops.rgb_to_grayscale)
    kernel = spec.blur_kernel_size
    views = _apply_where(views, params.blur, lambda x, s: color_ops.gaussian_blur(x, s, kernel), params.sigma)
    views = _apply_where(views, params.solarize, color_ops.solarize)
    views = _apply_where(views, params.equalize, color_ops.equalize)
    return views


def to_float_images(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) or (N, H, W) to float32 (N, C, H, W) in [0, 1] (float input must be in [0, 1])."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected images (N, C, H, W) with 1 or 3 channels, or (N, H, W); got {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
            raise ValueError("float images must hold values in [0, 1]; pass uint8 images for 0..255 data")
        return images.to(torch.float32)
    raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")


def _normalizer(mean: Sequence[float], std: Sequence[float], channels: int, device: torch.device) -> Callable:
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel ({channels})")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    inv = 1.0 / torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return lambda x: (x - m) * inv


class MultiCropAugment:
    """PAWS multi-crop: ``num_large`` views of ``large`` then ``num_small`` views of ``small`` per image."""

    def __init__(
        self,
        large: ViewSpec,
        small: ViewSpec | None,
        num_large: int = 2,
        num_small: int = 0,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        if mean is None or std is None:
            raise ValueError("MultiCropAugment needs mean= and std= (one value per image channel)")
        if num_large < 1:
            raise ValueError(f"num_large must be >= 1, got {num_large}")
        if num_small < 0:
            raise ValueError(f"num_small must be >= 0, got {num_small}")
        if num_small > 0 and small is None:
            raise ValueError(
                f"num_small={num_small} but no small ViewSpec was given; pass small= or num_small=0"
            )
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise ValueError(f"mean {mean} and std {std} need 1 or 3 values each, one per channel")
        self.large, self.small = large, small
        self.num_large, self.num_small = num_large, num_small
        self.mean, self.std = tuple(mean), tuple(std)

    def augment_views(
        self, images: Tensor, spec: ViewSpec, count: int, generator: torch.Generator
    ) -> list[Tensor]:
        """``count`` independently augmented, normalised views (each float32 (N, C, s, s)) of ``spec``."""
        return self._views(to_float_images(images), spec, count, generator)

    def __call__(self, images: Tensor, generator: torch.Generator) -> list[Tensor]:
        """Return the ``num_large`` large views followed by the ``num_small`` small views of a uint8 batch."""
        x = to_float_images(images)  # converted once and shared by both view kinds
        views = self._views(x, self.large, self.num_large, generator)
        if self.num_small > 0 and self.small is not None:
            views += self._views(x, self.small, self.num_small, generator)
        return views

    def render(self, images: Tensor, specs: Sequence[ViewSpec], generator: torch.Generator) -> list[Tensor]:
        """One view per spec, in order, of a uint8 batch; consecutive equal specs are drawn as one batch."""
        x = to_float_images(images)
        views: list[Tensor] = []
        start = 0
        while start < len(specs):
            end = start
            while end < len(specs) and specs[end] == specs[start]:
                end += 1
            views += self._views(x, specs[start], end - start, generator)
            start = end
        return views

    def _views(self, x: Tensor, spec: ViewSpec, count: int, generator: torch.Generator) -> list[Tensor]:
        # All count * N crops are rendered as one batch, then split back into views.
        normalize = _normalizer(self.mean, self.std, x.shape[1], x.device)
        params = sample_view_params(x.shape[0], x.shape[2], x.shape[3], spec, count, generator)
        views = normalize(apply_view_params(x, params, spec))
        return list(views.split(x.shape[0], dim=0))


def eval_transform(
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    size: int | None = None,
    resize: int | None = None,
) -> Tensor:
    """Evaluation preprocessing: to float, optionally resize the shorter side to ``resize`` (bilinear,
    antialiased), optionally centre-crop to ``size`` x ``size``, then normalise with mean/std.
    """
    x = to_float_images(images)
    if resize is not None:
        h, w = x.shape[-2:]
        if resize < 1:
            raise ValueError(f"resize must be a positive number of pixels, got {resize}")
        # torchvision's Resize(int): shorter side to ``resize``, longer side scaled and truncated.
        new_h, new_w = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    if size is not None:
        h, w = x.shape[-2:]
        if size < 1 or size > h or size > w:
            raise ValueError(f"cannot centre-crop {size}x{size} from {h}x{w} images; pass resize= >= {size}")
        top, left = round((h - size) / 2.0), round((w - size) / 2.0)
        x = x[:, :, top : top + size, left : left + size]
    return _normalizer(mean, std, x.shape[1], x.device)(x).contiguous()


def view_specs(cfg: AugmentSettings) -> tuple[ViewSpec, ViewSpec | None]:
    common = {
        "flip_p": cfg.flip_p,
        "jitter_p": cfg.jitter_p,
        "jitter_strength": cfg.jitter_strength,
        "grayscale_p": cfg.grayscale_p,
        "blur_p": cfg.blur_p,
        "solarize_p": cfg.solarize_p,
        "equalize_p": cfg.equalize_p,
    }
    large = ViewSpec(size=cfg.large_size, scale=tuple(cfg.large_scale), **common)
    small = ViewSpec(size=cfg.small_size, scale=tuple(cfg.small_scale), **common) if cfg.num_small else None
    return large, small
