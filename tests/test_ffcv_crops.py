"""The FFCV decoder's random numbers and crop law (paws_cli/data/backends/ffcv_ops.py): counter-based streams that are
uniform and unrelated, random-resized crops with torchvision's law and central-crop fallback, how decoded rows are
cut into views, and the sample/token encoding of the traversal order. tests/test_ffcv_loader.py tests the loader.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from torchvision import transforms

needs_ffcv = pytest.mark.skipif(
    importlib.util.find_spec("ffcv") is None,
    reason="ffcv is not installed here (`make setup` installs the ffcv extra)",
)

# ----------------------------------------------------------------------------------------------- random numbers


def stream(key: np.uint64, token: int, view: int) -> np.uint64:
    """A (key, token, view) stream state, as a uint64 (numba returns it to Python as an int)."""
    from paws_cli.data.backends import ffcv_ops

    return np.uint64(ffcv_ops.view_stream(key, np.uint64(token), np.uint64(view)))


@needs_ffcv
def test_stream_draws_are_uniform_and_unrelated() -> None:
    from scipy import stats

    from paws_cli.data.backends import ffcv_ops

    key = np.uint64(123456789)
    draws = np.array(
        [
            [ffcv_ops.stream_uniform(stream(key, t, v), d) for d in range(3)]
            for t in range(1500)
            for v in range(4)
        ]
    )  # (6000, 3): tokens x views, three draws each
    assert ((draws >= 0) & (draws < 1)).all()
    for column in range(3):
        assert stats.kstest(draws[:, column], "uniform").pvalue > 1e-3
    # Neighbouring tokens, views and draws are uncorrelated (|r| < 5 / sqrt(n)).
    by_view = draws[:, 0].reshape(1500, 4)
    limit = 5 / math.sqrt(1500)
    assert abs(np.corrcoef(by_view[:, 0], by_view[:, 1])[0, 1]) < limit
    assert abs(np.corrcoef(by_view[:-1, 0], by_view[1:, 0])[0, 1]) < limit
    assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 5 / math.sqrt(6000)
    # Another key gives other numbers.
    other = ffcv_ops.stream_uniform(stream(np.uint64(1), 0, 0), 0)
    assert other != draws[0, 0]


def torchvision_boxes(n: int, height: int, width: int, scale: tuple, seed: int) -> np.ndarray:
    """(top, left, h, w) rows from torchvision's RandomResizedCrop.get_params."""
    image = torch.zeros(1, height, width)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return np.array(
            [transforms.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]
        )


def our_boxes(n: int, height: int, width: int, scale: tuple, key: int = 7) -> np.ndarray:
    from paws_cli.data.backends import ffcv_ops

    lo, hi = math.log(3 / 4), math.log(4 / 3)
    return np.array(
        [
            ffcv_ops.crop_box(
                stream(np.uint64(key), t, 0),
                height,
                width,
                *scale,
                lo,
                hi,
            )
            for t in range(n)
        ]
    )


@needs_ffcv
@pytest.mark.parametrize(("height", "width", "scale"), [(375, 500, (0.14, 1.0)), (72, 96, (0.05, 0.14))])
def test_crop_law_matches_torchvision(height: int, width: int, scale: tuple) -> None:
    from scipy import stats

    ours, theirs = (
        our_boxes(3000, height, width, scale),
        torchvision_boxes(3000, height, width, scale, seed=1),
    )
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (h >= 1).all() and (w >= 1).all() and (top + h <= height).all() and (left + w <= width).all()
    for name, f in (
        ("area", lambda b: b[:, 2] * b[:, 3] / (height * width)),
        ("log aspect", lambda b: np.log(b[:, 3] / b[:, 2])),
        ("centre y", lambda b: (b[:, 0] + b[:, 2] / 2) / height),
        ("centre x", lambda b: (b[:, 1] + b[:, 3] / 2) / width),
    ):
        assert stats.ks_2samp(f(ours), f(theirs)).pvalue > 1e-3, name


@needs_ffcv
def test_crop_fallback_is_torchvisions_central_crop() -> None:
    # No attempt can fit a 2:1 box into a 1000x10 strip at these scales: the central crop with the ratio clamped.
    height, width = 10, 1000
    ours = our_boxes(5, height, width, (0.9, 1.0))
    theirs = torchvision_boxes(5, height, width, (0.9, 1.0), seed=0)
    assert (ours == theirs).all() and tuple(ours[0]) == (0, 493, 10, 13)


def test_group_views_cuts_rows_view_major() -> None:
    from paws_cli.data.backends.ffcv_loader import group_views

    # Two samples; per row: 2 views of 2x2 px, then 1 view of 1x1 px (HWC bytes, as the decoder writes them).
    rows = torch.arange(2 * 27, dtype=torch.uint8).view(2, 27)
    large, small = group_views(rows, [(0, 2, 2), (24, 1, 1)])
    assert large.shape == (4, 2, 2, 3) and small.shape == (2, 1, 1, 3)
    for v in range(2):
        for i in range(2):  # row v * B + i is view v of sample i
            assert torch.equal(large[v * 2 + i], rows[i, v * 12 : (v + 1) * 12].view(2, 2, 3))
    assert torch.equal(small.view(2, 3), rows[:, 24:])


@needs_ffcv
def test_encoded_indices_round_trip_and_overflow() -> None:
    from paws_cli.data.backends import ffcv_ops

    samples, tokens = np.array([0, 5, 9]), np.array([0, 7, 2**40])
    encoded = ffcv_ops.encode_tokens(samples, tokens, 10)
    assert encoded.dtype == np.uint64
    assert (encoded % np.uint64(10) == samples).all() and (encoded // np.uint64(10) == tokens).all()
    with pytest.raises(ValueError, match="outside"):
        ffcv_ops.encode_tokens(np.array([10]), np.array([0]), 10)
    with pytest.raises(ValueError, match="64 bits"):
        ffcv_ops.encode_tokens(np.array([1]), np.array([2**62]), 10)
