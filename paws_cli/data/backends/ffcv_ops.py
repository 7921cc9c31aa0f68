"""FFCV pieces of the .beton back end: a decode-once multi-crop decoder and a caller-planned traversal order.

Why a decoder of our own: FFCV's ``RandomResizedCropRGBImageDecoder`` makes one crop per decode, so PAWS' 2 large
+ M small views (several pipelines reading the same field) would decode every JPEG 2 + M times, and decoding is
most of the cost. :class:`MultiCropDecoder` decodes each image once and cuts all its views from the pixels, each
with its own random-resized crop (torchvision's RandomResizedCrop law) and horizontal flip, into one flat uint8
row per sample: ``[view 0 (s0, s0, 3), view 1, ...]`` in HWC order. No FFCV release has such an operation.

Why our own random numbers: FFCV's decoders draw crops from numba's per-thread ``np.random`` state, which FFCV's
``seed`` argument does not touch (it only seeds its built-in orders) and which depends on how samples are spread
over threads. Here every draw is a counter-based hash (SplitMix64) of (key, token, view, draw number): ``key``
fixes the run seed, rank and role; ``token`` numbers the sample's slot in the run (step x batch + position). A
crop is then a pure function of where it is used: the same on resume, whatever the thread count or timing.

The token travels inside the sample index. A traversal order hands FFCV plain integers per batch, and nothing
else reaches a decoder; :class:`PlannedOrder` passes ``token * num_samples + sample`` and the decoder splits it
again. Only this decoder reads the indices (the other fields' pipelines are disabled), and the OS-cache memory
manager reads by data pointer, not by index; FFCV's process cache (``os_cache=False``) would use the indices to
plan page reads, so this back end always uses the OS cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from ffcv.libffcv import imdecode, resize_crop
from ffcv.memory_managers.os_cache import OSCacheManager
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.traversal_order.base import TraversalOrder
from numba import njit, types

_U64 = np.uint64
# SplitMix64 constants (Steele, Lea and Flood 2014): the golden-ratio increment and the finaliser multipliers.
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MUL1 = _U64(0xBF58476D1CE4E5B9)
_MUL2 = _U64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = _U64(30), _U64(27), _U64(31), _U64(11)
_INV_2_53 = 1.0 / 9007199254740992.0
#: Draws per view: 2 per crop attempt (area, aspect) for 10 attempts, 2 offsets, 1 flip.
_ATTEMPTS = 10
_DRAW_TOP, _DRAW_LEFT, _DRAW_FLIP = 2 * _ATTEMPTS, 2 * _ATTEMPTS + 1, 2 * _ATTEMPTS + 2
_JPEG_MODE = 0  # RGBImageField's per-sample 'mode': 0 JPEG, 1 raw pixels


# FFCV's ctypes wrappers, compiled once per process rather than once per loader.
_imdecode = njit(nogil=True)(imdecode)
_resize_crop = njit(nogil=True)(resize_crop)


_READ_ONLY_BYTES = types.Array(types.uint8, 1, "C", readonly=True)
_OS_CACHE_STATE = types.Tuple([_READ_ONLY_BYTES, types.uint64[::1], types.uint64[::1]])


def _os_cache_reader(self: OSCacheManager) -> Callable[..., Any]:
    """The OS cache's sample reader: the bytes of the sample stored at ``pointer`` in the memory-mapped file."""

    def read(pointer, state):  # noqa: ANN001  (numba-compiled; typed by the signature below)
        file_bytes, pointers, sizes = state
        return file_bytes[pointer : pointer + sizes[np.searchsorted(pointers, pointer)]]

    return Compiler.compile(read, _READ_ONLY_BYTES(types.uint64, _OS_CACHE_STATE))


# FFCV 1.0.2 types its reader by *assigning* ``mutable = False`` to numba's interned ``uint8[::1]`` type object,
# every time a loader is made. Type objects are dictionary keys all over numba (each compiled function's table
# of signatures, the type registry), so the changed hash corrupts those dictionaries: the second loader of a
# process fails with ``KeyError: (Array(uint8, 1, 'C', True, ...), ...)`` in its loading thread, or hangs.
# The same reader typed with a read-only array type of its own changes nothing shared.
OSCacheManager.compile_reader = _os_cache_reader
OSCacheManager.state_type = property(lambda self: _OS_CACHE_STATE)


@njit(cache=True)
def mix64(z: np.uint64) -> np.uint64:
    """SplitMix64's finaliser: a bijection of 64-bit words whose output bits all depend on every input bit."""
    z = (z ^ (z >> _S30)) * _MUL1
    z = (z ^ (z >> _S27)) * _MUL2
    return z ^ (z >> _S31)


@njit(cache=True)
def view_stream(key: np.uint64, token: np.uint64, view: np.uint64) -> np.uint64:
    """The state of one (key, token, view) stream; its draws are :func:`stream_uniform` of it."""
    return mix64(mix64(key + token * _GOLDEN) + (view + _U64(1)) * _MUL2)


@njit(cache=True)
def stream_uniform(state: np.uint64, draw: int) -> float:
    """Draw number ``draw`` of a stream, uniform on [0, 1) with 53 random bits."""
    bits = mix64(state + _U64(draw + 1) * _GOLDEN) >> _S11
    return float(bits) * _INV_2_53


@njit(cache=True)
def crop_box(
    state: np.uint64,
    height: int,
    width: int,
    scale_lo: float,
    scale_hi: float,
    logr_lo: float,
    logr_hi: float,
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) with torchvision's RandomResizedCrop.get_params law.

    Up to 10 attempts of area fraction ~ U(scale) and log aspect ~ U(log ratio), rounded half to even like
    Python's round(); the first that fits wins, with offsets uniform over the valid positions. Without one,
    the central crop with the aspect ratio clamped to the ratio range.
    """
    area = float(height) * float(width)
    for attempt in range(_ATTEMPTS):
        target = area * (scale_lo + (scale_hi - scale_lo) * stream_uniform(state, 2 * attempt))
        aspect = math.exp(logr_lo + (logr_hi - logr_lo) * stream_uniform(state, 2 * attempt + 1))
        w = int(np.round(math.sqrt(target * aspect)))
        h = int(np.round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = math.floor(stream_uniform(state, _DRAW_TOP) * (height - h + 1))
            left = math.floor(stream_uniform(state, _DRAW_LEFT) * (width - w + 1))
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < math.exp(logr_lo):
        w, h = width, int(np.round(width / math.exp(logr_lo)))
    elif in_ratio > math.exp(logr_hi):
        w, h = int(np.round(height * math.exp(logr_hi))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@njit(cache=True)
def flip_columns(image: np.ndarray) -> None:
    """Mirror an (H, W, C) image left-right in place."""
    rows, cols, channels = image.shape
    for r in range(rows):
        for c in range(cols // 2):
            for k in range(channels):
                tmp = image[r, c, k]
                image[r, c, k] = image[r, cols - 1 - c, k]
                image[r, cols - 1 - c, k] = tmp


@dataclass(frozen=True)
class CropGroup:
    """``count`` views of side ``size`` cut with RandomResizedCrop(scale, ratio) and flipped with ``flip_p``."""

    size: int
    count: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    @property
    def view_bytes(self) -> int:
        return self.size * self.size * 3


def row_layout(groups: Sequence[CropGroup]) -> list[tuple[int, int]]:
    """(byte offset, byte length) of each group's views in a decoded row; the last end is the row length."""
    out, offset = [], 0
    for group in groups:
        out.append((offset, group.count * group.view_bytes))
        offset += group.count * group.view_bytes
    return out


class MultiCropDecoder(Operation):
    """Decode an ``RGBImageField`` once per sample and cut every view of ``groups`` from it (see module doc).

    Output per sample: one flat uint8 row (all views, HWC, concatenated in group order). ``key`` seeds the
    crops and flips together with each sample's token; ``num_samples`` is the .beton's sample count, by which
    the planned indices are split into (token, sample).
    """

    def __init__(self, groups: Sequence[CropGroup], key: int, num_samples: int) -> None:
        super().__init__()
        if not groups or any(g.count < 1 or g.size < 1 for g in groups):
            raise ValueError(
                f"MultiCropDecoder needs groups of at least one view of positive size, got {groups}"
            )
        self.groups = tuple(groups)
        self.key = int(key) & (2**64 - 1)
        self.num_samples = int(num_samples)
        self.row_bytes = sum(g.count * g.view_bytes for g in self.groups)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        # Room to decode the largest stored image, one buffer per sample of a batch (FFCV decodes in parallel).
        largest = int(self.metadata["height"].max()) * int(self.metadata["width"].max()) * 3
        self.largest_image = largest
        return (
            replace(previous_state, jit_mode=True, shape=(self.row_bytes,), dtype=np.dtype("<u1")),
            (
                AllocationQuery((self.row_bytes,), np.dtype("<u1")),
                AllocationQuery((largest,), np.dtype("<u1")),
            ),
        )

    def generate_code(self) -> Callable[..., Any]:
        mem_read = self.memory_read
        parallel_range = Compiler.get_iterator()
        imdecode_c, resize_crop_c = _imdecode, _resize_crop
        # One row per view (groups expanded), as arrays: numba freezes them into the compiled code.
        views = [g for g in self.groups for _ in range(g.count)]
        sizes = np.array([g.size for g in views], dtype=np.int64)
        offsets = np.cumsum([0] + [g.view_bytes for g in views[:-1]]).astype(np.int64)
        bounds = np.array(
            [(g.scale[0], g.scale[1], math.log(g.ratio[0]), math.log(g.ratio[1]), g.flip_p) for g in views],
            dtype=np.float64,
        )
        num_views = len(views)
        key = _U64(self.key)
        num_samples = _U64(self.num_samples)
        jpeg = _JPEG_MODE

        def decode(batch_indices, my_storage, metadata, storage_state):  # noqa: ANN001  (FFCV's calling convention)
            destination, scratch = my_storage
            no = len(batch_indices) < 0
            for i in parallel_range(len(batch_indices)):
                planned = _U64(batch_indices[i])
                sample = planned % num_samples
                token = planned // num_samples
                field = metadata[sample]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpeg:
                    pixels = scratch[i][: 3 * height * width]
                    # No crop, no scaling, no flip; arguments typed at run time (see _imdecode's comment).
                    zero = height - height
                    imdecode_c(
                        data, pixels, height, width, height, width, zero, zero, zero + 1, zero + 1, no, no
                    )
                    image = pixels.reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                row = destination[i]
                for v in range(num_views):
                    state = view_stream(key, token, _U64(v))
                    lo, hi, rlo, rhi, flip_p = (
                        bounds[v, 0],
                        bounds[v, 1],
                        bounds[v, 2],
                        bounds[v, 3],
                        bounds[v, 4],
                    )
                    top, left, h, w = crop_box(state, int(height), int(width), lo, hi, rlo, rhi)
                    size = sizes[v]
                    out = row[offsets[v] : offsets[v] + size * size * 3].reshape(size, size, 3)
                    resize_crop_c(image, top, top + h, left, left + w, out)
                    if stream_uniform(state, _DRAW_FLIP) < flip_p:
                        flip_columns(out)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class PlannedOrder(TraversalOrder):
    """A traversal order that returns whatever the caller planned for the next pass (:meth:`plan`).

    FFCV 1.0.2 accepts a custom order as an *instance* (``isinstance(order, TraversalOrder)``) and then calls
    it with the loader, so the loader is bound in ``__call__``. FFCV's ``distributed`` and ``seed`` are unused:
    the planned indices already are this process's share, in the samplers' order.
    """

    def __init__(self, first: np.ndarray) -> None:  # no loader yet: see the class docstring
        self._planned = np.asarray(first, dtype=np.uint64)

    def __call__(self, loader: Any) -> PlannedOrder:
        self.loader = loader
        self.indices = loader.indices
        self.seed = loader.seed
        self.distributed = loader.distributed
        self.sampler = None
        return self

    def plan(self, order: np.ndarray) -> None:
        """The indices (already token-encoded) that the next ``iter(loader)`` traverses, batch after batch."""
        self._planned = np.asarray(order, dtype=np.uint64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self._planned


def encode_tokens(samples: np.ndarray, tokens: np.ndarray, num_samples: int) -> np.ndarray:
    """``token * num_samples + sample`` as uint64, checked against overflow (see the module docstring)."""
    samples = np.asarray(samples, dtype=np.uint64)
    tokens = np.asarray(tokens, dtype=np.uint64)
    if samples.size and int(samples.max()) >= num_samples:
        raise ValueError(f"sample index {int(samples.max())} is outside the .beton's {num_samples} samples")
    if tokens.size and (int(tokens.max()) + 1) * num_samples > 2**64 - 1:
        raise ValueError(
            f"the run is too long to number its samples in 64 bits ({int(tokens.max())} slots x {num_samples} "
            "images); this is a limit of the FFCV back end's crop seeding"
        )
    return tokens * _U64(num_samples) + samples
