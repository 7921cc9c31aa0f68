"""One view of the folder back end (paws_cli/data/backends/folder.py): PIL crops, flips, grayscale and blur doing what
they say, the blur's seeded sigma, rendering that leaves the caller's RNG alone, and distinct view seeds.
tests/test_folder_data.py tests the batches, splits, evaluation and end-to-end use of the folder back end.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from paws_cli.data.augment.views import ViewSpec
from paws_cli.data.backends import folder as fd


def _square_image(side: int = 40) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8))


def _plain(size: int, **changes: float) -> ViewSpec:
    """A view that keeps the whole (square) image and applies nothing unless ``changes`` switch it on."""
    values = {"flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, **changes}
    return ViewSpec(size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0), **values)


def test_full_crop_is_a_plain_bilinear_resize() -> None:
    image = _square_image()
    (view,) = fd.render_views(image, [fd.view_transform(_plain(16))], [123])
    expected = np.asarray(image.resize((16, 16), Image.BILINEAR)).transpose(2, 0, 1)
    assert view.dtype == torch.uint8 and view.shape == (3, 16, 16)
    assert np.array_equal(view.numpy(), expected)


def test_flip_grayscale_and_blur_do_what_they_say() -> None:
    image = _square_image()
    seed = 77
    (plain,) = fd.render_views(image, [fd.view_transform(_plain(20))], [seed])
    (flipped,) = fd.render_views(image, [fd.view_transform(_plain(20, flip_p=1.0))], [seed])
    assert torch.equal(flipped, plain.flip(-1))
    (gray,) = fd.render_views(image, [fd.view_transform(_plain(20, grayscale_p=1.0))], [seed])
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # ITU-R 601-2 luma of the plain view, as PIL's convert("L") computes it (integer rounding: within 1)
    rgb = plain.double()
    luma = (rgb[0] * 299 + rgb[1] * 587 + rgb[2] * 114) / 1000
    assert (gray[0].double() - luma).abs().max() <= 1.0
    (blurred,) = fd.render_views(image, [fd.view_transform(_plain(20, blur_p=1.0))], [seed])
    # a Gaussian blur of random noise lowers its pixel-to-pixel variation
    assert blurred.double().diff(dim=-1).abs().mean() < 0.8 * plain.double().diff(dim=-1).abs().mean()


def test_blur_sigma_is_drawn_in_range_from_the_seeded_rng() -> None:
    blur = fd.RandomPILBlur(p=1.0, sigma=(0.1, 2.0))
    image = _square_image()
    torch.manual_seed(5)
    first = np.asarray(blur(image))
    torch.manual_seed(5)
    assert np.array_equal(first, np.asarray(blur(image)))
    torch.manual_seed(5)
    torch.rand(1)  # the p draw
    radius = 0.1 + 1.9 * torch.rand(1).item()
    assert np.array_equal(first, np.asarray(image.filter(fd.ImageFilter.GaussianBlur(radius=radius))))


def test_rendering_keeps_the_callers_rng_state() -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    fd.render_views(_square_image(), [fd.view_transform(ViewSpec(size=8, scale=(0.2, 1.0)))], [1])
    assert torch.equal(torch.rand(3), expected)


def test_view_seeds_differ_for_every_place_and_view() -> None:
    seeds = {
        fd.view_seed(0, rank, step, role, pos, view)
        for rank in range(2)
        for step in range(4)
        for role in (fd.UNLABELLED, fd.SUPPORT)
        for pos in range(8)
        for view in range(4)
    }
    assert len(seeds) == 2 * 4 * 2 * 8 * 4
    assert fd.view_seed(0, 0, 1, 0, 2, 3) == fd.view_seed(0, 0, 1, 0, 2, 3)
    assert fd.view_seed(1, 0, 1, 0, 2, 3) != fd.view_seed(0, 0, 1, 0, 2, 3)
