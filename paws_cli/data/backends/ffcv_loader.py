"""Training data from an FFCV .beton (data.format=ffcv): multi-crop decoding by FFCV, colour ops on the device.

- The .beton and its sidecar index come from `paws convert-dataset imagefolder`; the sidecar gives every sample's
  file name and label, so the labelled subset is ``data.split`` resolved by file name (the official lists name
  files such as ``n01440764_10026.JPEG``) or the same seeded class-balanced draw as the folder back end.
- What is served is what the method declares (``DataNeeds``): PAWS's 2 large + M small views and a support batch,
  or a method's own views (``DataNeeds.views``: each run of equal consecutive specs is one crop group of the
  decoder and one colour kind, so per-view BYOL presets work) with the labels (-1 outside the labelled subset),
  ids and true labels of the batch's images, and optionally a labelled sub-batch (decoded by the support loader
  with the batch's views, then appended to the batch), as the in-memory back end serves them.
- Which images a step uses is decided by the shared samplers (``UnlabelledOrder``, ``SupportSampler``: the same
  distributed semantics and checkpointable state as every other back end). FFCV's own ordering and its
  ``distributed`` option are not used; a planned traversal order hands FFCV this process's indices.
- FFCV decodes each image once and cuts its views (random-resized crop, horizontal flip) in numba threads
  (:mod:`paws_cli.data.backends.ffcv_ops`); the uint8 views go to the device (pinned memory and non-blocking copies on
  CUDA), where colour jitter (random op order, probability jitter_p), grayscale, Gaussian blur, solarize and
  equalize run as batched tensor ops with per-sample parameters (:mod:`paws_cli.data.augment.views`), then
  normalisation with ImageNet's statistics, in channels_last layout when model.channels_last is set. On a CPU
  device the same draws drive per-view 8-bit OpenCV ops instead (:mod:`paws_cli.data.augment.color_ops_uint8`, several
  times cheaper there; data.ffcv_colour_ops chooses).

Reproducibility: crops and flips are a hash of (run.seed, rank, role, global step, position in the batch, view)
and the colour parameters come from a generator seeded by (run.seed, rank, global step) as on the other back
ends, so an interrupted and resumed run gets bit-identical batches (same device and library versions): nothing
depends on FFCV's thread scheduling or on numba's random state (FFCV's own ``seed`` argument only seeds its
built-in orders; its crop decoders draw from numba's per-thread state, which nothing seeds). What is not pinned:
the numbers differ from the folder back end's (another random stream; libjpeg-turbo's fast IDCT and OpenCV's
area resize instead of PIL's decoder and bilinear resize), and GPU colour ops may differ from CPU ones in the
last bits. Changing the world size on resume (same global batch) keeps the images but not their views.

Costs: data.num_workers is the number of FFCV decoding threads in each training process. FFCV keeps
``batches_ahead + 2`` pinned buffers per loader, each with room to decode a batch of the largest stored image
(`convert-dataset --max-resolution` bounds it). Unreadable files never reach the .beton (the converter leaves
them out and lists them in the sidecar), so data.bad_images has nothing to do here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from paws_cli.config.schema import DataSettings, Settings
from paws_cli.data.augment.color_ops_uint8 import Normalizer, apply_colour_params_uint8
from paws_cli.data.augment.views import ViewSpec, apply_colour_params, sample_colour_params, view_specs
from paws_cli.data.backends.folder import IMAGENET_MEAN, IMAGENET_STD
from paws_cli.data.backends.sidecar import Sidecar, read_sidecar
from paws_cli.data.needs import DataNeeds, needs_of, require_servable
from paws_cli.data.sampling.batch import Batch, label_tables, step_generator
from paws_cli.data.sampling.samplers import build_samplers
from paws_cli.data.splits.files import make_balanced_split, read_split, resolve_names

FFCV_MISSING = (
    "data.format=ffcv needs FFCV, which is not installed in this environment. Install it with `make setup` "
    "(as root: it installs the Debian build packages and the ffcv extra), or by hand: `apt-get install "
    "pkg-config g++ libturbojpeg0-dev libopencv-dev`, then `pip install -c constraints.txt 'paws-cli[ffcv]'` "
    "(or `pip install -e '.[ffcv]'` in a checkout). Without FFCV, train on the JPEG folder with data.format=folder"
)
#: Roles of the two loaders; part of each one's crop key, so they never share random streams.
UNLABELLED, SUPPORT = 0, 1
_KEY_TAG = 0xFFC5


def require_ffcv() -> None:
    """Raise a ValueError saying how to install FFCV when it (or its numba) cannot be imported."""
    try:
        import ffcv  # noqa: F401
        import numba  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"{FFCV_MISSING} ({type(exc).__name__}: {exc})") from None


def crop_key(seed: int, rank: int, role: int) -> int:
    """The 64-bit key of one loader's crop stream (SeedSequence mixing of the integers)."""
    words = np.random.SeedSequence([_KEY_TAG, seed, rank, role]).generate_state(2)
    return (int(words[0]) << 32) | int(words[1])


def beton_labelled(cfg: DataSettings, sidecar: Sidecar) -> tuple[np.ndarray, str]:
    """Sorted .beton indices of the labelled subset, and where they came from (one line).

    A split file names files (resolved through the sidecar, with hints when names are missing, e.g. files the
    conversion skipped); without one, the seeded class-balanced draw of the folder back end over the same
    labels in the same (ImageFolder) order, so both back ends pick the same files from the same folder.
    """
    if cfg.split is not None:
        split = read_split(cfg.split)
        if split.kind != "name":
            raise ValueError(
                f"data.split={cfg.split} lists integer indices, but .beton data is matched by file name through "
                f"its sidecar index {sidecar.path}; use a file-name split such as the official lists or one from "
                "`paws make-splits`"
            )
        ids = resolve_names(
            split,
            sidecar.files,
            dataset=f"the FFCV file {sidecar.beton}",
            skipped=[s["file"] for s in sidecar.skipped],
        )
        ids = np.sort(ids)
        return ids, f"split file {cfg.split} ({len(ids)} labelled images)"
    ids = make_balanced_split(
        sidecar.labels_array(), per_class=cfg.labels_per_class, percent=cfg.label_percent, seed=cfg.split_seed
    )
    amount = (
        f"{cfg.labels_per_class} per class" if cfg.labels_per_class else f"{cfg.label_percent}% per class"
    )
    return ids, f"seeded class-balanced draw, {amount}, seed {cfg.split_seed} ({len(ids)} labelled images)"


def spec_runs(specs: Sequence[ViewSpec]) -> list[tuple[ViewSpec, int]]:
    """(spec, count) per run of equal consecutive specs, in order: each run is one crop group and colour kind."""
    runs: list[tuple[ViewSpec, int]] = []
    for spec in specs:
        if runs and runs[-1][0] == spec:
            runs[-1] = (spec, runs[-1][1] + 1)
        else:
            runs.append((spec, 1))
    return runs


class DeviceColour:
    """The photometric half of a view kind on the training device: uint8 HWC views in, normalised floats out."""

    def __init__(
        self,
        spec: ViewSpec,
        device: torch.device,
        channels_last: bool,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ops: str = "auto",
    ) -> None:
        if ops not in ("auto", "tensor", "opencv"):
            raise ValueError(f"data.ffcv_colour_ops must be auto, tensor or opencv, got {ops!r}")
        if ops == "opencv" and device.type != "cpu":
            raise ValueError(
                f"data.ffcv_colour_ops=opencv runs on the CPU, but run.device is {device.type}: use tensor "
                "(or auto) to colour the views on the device"
            )
        self.spec = spec
        self.use_opencv = ops == "opencv" or (ops == "auto" and device.type == "cpu")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.normalizer = Normalizer(mean, std, channels_last)

    def __call__(self, views: Tensor, generator: torch.Generator) -> Tensor:
        """``views``: uint8 (n, s, s, 3); returns float32 (n, 3, s, s) with this kind's colour ops applied."""
        params = sample_colour_params(views.shape[0], self.spec, generator)
        if self.use_opencv:
            return self.normalizer(apply_colour_params_uint8(views.numpy(), params, self.spec))
        # NHWC permuted to NCHW is already channels_last in memory: the float copy keeps that layout.
        x = views.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        x = apply_colour_params(x, params, self.spec)
        return ((x - self.mean) * self.inv_std).contiguous(memory_format=self.memory_format)


def group_views(rows: Tensor, layout: Sequence[tuple[int, int, int]]) -> list[Tensor]:
    """Cut decoded rows (B, row bytes) into one uint8 (count * B, s, s, 3) tensor per group, view-major.

    ``layout``: (byte offset, views in the group, side) per group, as the decoder wrote them. Row ``v * B + i``
    of a group is view v of sample i, the order :func:`sample_colour_params` draws in.
    """
    batch = rows.shape[0]
    out = []
    for offset, count, size in layout:
        part = rows[:, offset : offset + count * size * size * 3].view(batch, count, size, size, 3)
        out.append(part.transpose(0, 1).reshape(count * batch, size, size, 3))
    return out


class _BetonLoader:
    """One FFCV loader of decoded view rows (one role), fed batch by batch with planned indices."""

    def __init__(
        self,
        beton: Path,
        kinds: Sequence[tuple[ViewSpec, int, DeviceColour]],
        *,
        key: int,
        num_samples: int,
        batch_size: int,
        steps_per_epoch: int,
        workers: int,
        device: torch.device,
        seed: int,
    ) -> None:
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToDevice, ToTensor

        from paws_cli.data.backends import ffcv_ops

        self.groups = tuple(
            ffcv_ops.CropGroup(
                size=spec.size, count=count, scale=spec.scale, ratio=spec.ratio, flip_p=spec.flip_p
            )
            for spec, count, _ in kinds
        )
        self.colours = [colour for _, _, colour in kinds]
        self.num_samples, self.batch_size = num_samples, batch_size
        self.layout = [
            (offset, g.count, g.size)
            for (offset, _), g in zip(ffcv_ops.row_layout(self.groups), self.groups, strict=True)
        ]
        decoder = ffcv_ops.MultiCropDecoder(self.groups, key=key, num_samples=num_samples)
        transforms: list[Any] = [ToTensor()]
        if device.type == "cuda":
            transforms.append(ToDevice(device, non_blocking=True))
        # FFCV's first traversal fixes len(loader) (it slices every later pass to that length): plan a full
        # epoch of placeholders; resumed epochs are shorter, never longer.
        self.order = ffcv_ops.PlannedOrder(np.zeros(steps_per_epoch * batch_size, dtype=np.uint64))
        self.loader = Loader(
            str(beton),
            batch_size=batch_size,
            num_workers=workers,
            os_cache=True,  # the process cache would read pages by (token-encoded) index, see ffcv_ops
            order=self.order,
            distributed=False,
            seed=seed,  # unused by a planned order; given so that FFCV does not draw one from numpy's global RNG
            pipelines={
                "image": None,
                "label": None,
                "views": PipelineSpec("image", decoder=decoder, transforms=transforms),
            },
            drop_last=True,
        )
        self._encode = ffcv_ops.encode_tokens

    def batches(self, samples: np.ndarray, first_step: int) -> Any:
        """FFCV's iterator over the batches ``samples`` (steps x batch .beton indices; the first is at global step
        ``first_step``): each item is a 1-tuple holding the decoded rows; ``close()`` stops its loading thread."""
        steps, batch = samples.shape
        slots = (first_step + np.arange(steps, dtype=np.int64))[:, None] * batch + np.arange(batch)
        self.order.plan(self._encode(samples.reshape(-1), slots.reshape(-1), self.num_samples))
        return iter(self.loader)

    def views(self, rows: Tensor, device: torch.device, generator: torch.Generator) -> list[Tensor]:
        """Decoded rows -> this role's views: per group, colour ops on the device, then one tensor per view."""
        batch = rows.shape[0]
        rows = rows.to(device, non_blocking=True)  # a no-op where FFCV already moved them
        out: list[Tensor] = []
        for colour, views in zip(self.colours, group_views(rows, self.layout), strict=True):
            out += list(colour(views, generator).split(batch))
        return out


class FFCVTrainData:
    """Training batches of one process from a .beton (the TrainDataLike protocol of data/sources.py)."""

    def __init__(
        self,
        settings: Settings,
        *,
        device: torch.device,
        world_size: int = 1,
        rank: int = 0,
        needs: DataNeeds | None = None,
    ) -> None:
        needs = needs_of(settings) if needs is None else needs
        threads = _torch_threads(settings)  # importing or running FFCV sets torch's thread count: put it back
        try:
            self._build(settings, device, world_size, rank, needs)
        finally:
            torch.set_num_threads(threads)

    def _build(
        self, settings: Settings, device: torch.device, world_size: int, rank: int, needs: DataNeeds
    ) -> None:
        require_servable(needs, "ffcv")
        need_unlabelled = needs.unlabelled_views
        require_ffcv()
        import numba

        cfg = settings.data
        if cfg.path is None:
            raise ValueError(
                "data.format=ffcv needs data.path=<the train .beton from `paws convert-dataset`>"
            )
        beton = Path(cfg.path).expanduser()
        if not beton.is_file():
            raise FileNotFoundError(
                f"data.path={beton} is not a file; give the train .beton written by "
                "`paws convert-dataset imagefolder SRC_DIR OUT.beton`"
            )
        self.sidecar = read_sidecar(beton)
        _check_fields(beton)
        self.settings, self.device, self.rank = settings, device, rank
        self.needs, self.need_unlabelled = needs, need_unlabelled
        self.name, self.num_classes, self.in_chans = "imagefolder", len(self.sidecar.classes), 3
        # Unreadable files were left out when the .beton was written (the sidecar lists them): none to replace.
        self.skipped_images = 0
        self.skipped_files: list[str] = []
        labelled, self.labelled_description = beton_labelled(cfg, self.sidecar)
        labels = self.sidecar.labels_array()
        self.labelled = torch.as_tensor(labelled, dtype=torch.long)
        self.labelled_classes = torch.as_tensor(labels[labelled], dtype=torch.long)
        # Labels of the train images as the batch shows them: the label inside the labelled subset, else -1.
        self.true_labels, self.batch_labels = label_tables(labels, labelled)
        self.order, self.supports = build_samplers(
            labels,
            labelled,
            needs,
            batch_size=settings.optim.batch_size,
            world_size=world_size,
            rank=rank,
            seed=settings.run.seed,
        )
        self._make_loaders(beton, numba.config.NUMBA_NUM_THREADS)

    def _make_loaders(self, beton: Path, numba_threads: int) -> None:
        """The FFCV loaders of the unlabelled batch and of the support (or labelled sub-) batch."""
        settings, needs, device, rank = self.settings, self.needs, self.device, self.rank
        cfg, aug, seed = settings.data, settings.augment, settings.run.seed
        large, small = view_specs(aug)

        def colour(spec: ViewSpec) -> DeviceColour:
            return DeviceColour(spec, device, settings.model.channels_last, ops=cfg.ffcv_colour_ops)

        large_colour = colour(large)
        if large_colour.use_opencv:
            import cv2

            # Each OpenCV call works on one view of at most a few hundred pixels a side: its own worker threads
            # cost more CPU than they save there (82 vs 56 ms of CPU per 96 views of 224 px), and FFCV's
            # decoding threads already keep the other cores busy.
            cv2.setNumThreads(1)
        if needs.views is not None:  # the method's own views: one kind per run of equal consecutive specs
            unlabelled_kinds = [(spec, count, colour(spec)) for spec, count in spec_runs(needs.views)]
        else:  # PAWS's multi-crop
            unlabelled_kinds = [(large, 2, large_colour)]
            if small is not None and aug.num_small:
                unlabelled_kinds.append((small, aug.num_small, colour(small)))
        # FFCV decodes in numba threads of this process; numba refuses more than it started with.
        self.workers = max(1, min(cfg.num_workers, int(numba_threads)))
        common = dict(
            num_samples=self.sidecar.num_images,
            steps_per_epoch=self.order.steps_per_epoch,
            workers=self.workers,
            device=device,
        )
        self._unlabelled = (
            _BetonLoader(
                beton,
                unlabelled_kinds,
                key=crop_key(seed, rank, UNLABELLED),
                batch_size=settings.optim.batch_size,
                seed=_ffcv_seed(seed, rank, UNLABELLED),
                **common,
            )
            if needs.unlabelled_views
            else None
        )
        # The labelled sub-batch joins the batch: its images get the batch's views.
        sup = needs.support or needs.labelled_sub_batch
        support_kinds = (
            unlabelled_kinds
            if needs.labelled_sub_batch is not None
            else [(large, aug.support_views, large_colour)]
        )
        self._supports = (
            None
            if sup is None
            else _BetonLoader(
                beton,
                support_kinds,
                key=crop_key(seed, rank, SUPPORT),
                batch_size=sup.classes_per_batch * sup.images_per_class,
                seed=_ffcv_seed(seed, rank, SUPPORT),
                **common,
            )
        )

    # --- the protocol ---

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    def describe(self) -> str:
        skipped = len(self.sidecar.skipped)
        left_out = f" ({skipped} unreadable files left out at conversion)" if skipped else ""
        return (
            f"FFCV file {self.sidecar.beton}: {self.sidecar.num_images} train images{left_out}, "
            f"{self.num_classes} classes; decoded once per image by FFCV in {self.workers} thread"
            f"{'s' if self.workers != 1 else ''} per process, colour ops on {self.device.type}"
        )

    def state_dict(self) -> dict[str, Any]:
        """The samplers' positions at the batches served so far."""
        state = {"unlabelled": self.order.state_dict()}
        if self.supports is not None:
            state["supports"] = self.supports.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.order.load_state_dict(state["unlabelled"])
        if self.supports is not None:
            self.supports.load_state_dict(state["supports"])

    def epoch(self, epoch: int, first_step: int) -> Iterator[Batch]:
        """The remaining batches of ``epoch``; ``first_step`` is the global step of the first one (it seeds
        its crops and colour parameters)."""
        self.order.set_epoch(epoch)
        if self.supports is not None:
            self.supports.set_epoch(epoch)
        # FFCV needs a whole pass planned ahead: draw the rest of the epoch from the samplers, then put their
        # cursors back and move them batch by batch as batches are served (what checkpoints record).
        unlabelled_iter = iter(self.order)
        support_iter = iter(self.supports) if self.supports is not None else None
        epoch, start = self.order.epoch, self.order.position
        support_start = None if self.supports is None else (self.supports.epoch, self.supports.position)
        unlabelled = list(unlabelled_iter)
        supports = None if support_iter is None else list(support_iter)
        count = len(unlabelled) if supports is None else min(len(unlabelled), len(supports))
        self._move_cursors(epoch, start, support_start, 0)
        if count == 0:
            return
        batch_ids = torch.stack(unlabelled[:count])  # (count, B) .beton indices
        support_ids = None if supports is None else torch.stack(supports[:count])  # into the labelled subset
        threads = torch.get_num_threads()
        batch_stream = support_stream = None
        try:
            # One loader is started (and its code compiled) after the other: numba's compiler is not safe to
            # run from two loading threads at once.
            if self._unlabelled is not None:
                batch_stream = _Stream(self._unlabelled)
                batch_stream.start(batch_ids.numpy(), first_step)
            if self._supports is not None and support_ids is not None:
                support_stream = _Stream(self._supports)
                support_stream.start(self.labelled[support_ids].numpy(), first_step)
            torch.set_num_threads(threads)  # FFCV's loading threads have set it by their first batch
            for k in range(count):
                generator = step_generator(self.settings.run.seed, self.rank, first_step + k, self.device)
                views = [] if batch_stream is None else batch_stream.views(self.device, generator)
                picks = None if support_ids is None else support_ids[k]
                extra = [] if support_stream is None else support_stream.views(self.device, generator)
                batch = self._batch(batch_ids[k], views, picks, extra)
                self._move_cursors(epoch, start, support_start, k + 1)
                yield batch
        finally:
            for stream in (batch_stream, support_stream):  # an epoch left early (max_steps, errors) stops
                if stream is not None:  # FFCV's loading thread
                    stream.close()
            torch.set_num_threads(threads)

    # --- helpers ---

    def _batch(self, ids: Tensor, views: list[Tensor], picks: Tensor | None, extra: list[Tensor]) -> Batch:
        """One step's Batch from its images' views and the support sampler's picks (indices into the labelled
        subset) with their views: a support batch, or a labelled sub-batch appended to the batch itself."""
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        if picks is not None and self.needs.labelled_sub_batch is not None:
            layout = torch.channels_last if self.settings.model.channels_last else torch.contiguous_format
            views = [
                torch.cat([v, e]).contiguous(memory_format=layout) for v, e in zip(views, extra, strict=True)
            ]
            ids = torch.cat([ids, self.labelled[picks]])
            batch = Batch(views, [], empty)
        elif picks is not None:
            batch = Batch(views, extra, self.labelled_classes[picks].to(self.device, non_blocking=True))
        else:
            batch = Batch(views, [], empty)
        if self.needs.labels_in_batch:
            batch.labels = self.batch_labels[ids].to(self.device, non_blocking=True)
            batch.ids = ids.to(self.device, non_blocking=True)
            batch.true_labels = self.true_labels[ids].to(self.device, non_blocking=True)
        return batch

    def _move_cursors(
        self, epoch: int, start: int, support_start: tuple[int, int] | None, served: int
    ) -> None:
        self.order.epoch, self.order.position = epoch, start + served
        if self.supports is not None and support_start is not None:
            self.supports.epoch, self.supports.position = support_start[0], support_start[1] + served


def _torch_threads(settings: Settings) -> int:
    """The torch CPU thread count this process should have: run.num_threads, else what it had before FFCV.

    FFCV sets torch's count to 1 when it is imported and to its worker count when a loader starts; when FFCV
    was imported before (the current count is then FFCV's), fall back to every core available to the process.
    """
    if settings.run.num_threads:
        return settings.run.num_threads
    if "ffcv" not in sys.modules:
        return torch.get_num_threads()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Stream:
    """One role's pass over FFCV batches."""

    def __init__(self, loader: _BetonLoader) -> None:
        self.loader = loader
        self.iterator: Any = None
        self._first: Tensor | None = None

    def start(self, samples: np.ndarray, first_step: int) -> None:
        """Start FFCV's loading thread and wait for the first batch (by then its code is compiled)."""
        self.iterator = self.loader.batches(samples, first_step)
        self._first = next(self.iterator)[0]

    def views(self, device: torch.device, generator: torch.Generator) -> list[Tensor]:
        """The next batch's views (colour ops drawn from ``generator``)."""
        if self._first is not None:
            rows, self._first = self._first, None
        else:
            rows = next(self.iterator)[0]
        return self.loader.views(rows, device, generator)

    def close(self) -> None:
        if self.iterator is not None:
            self.iterator.close()


def _ffcv_seed(seed: int, rank: int, role: int) -> int:
    """A 31-bit seed for FFCV's loader (it only seeds FFCV's built-in orders, which are not used here)."""
    return crop_key(seed, rank, role) & 0x7FFFFFFF


def _check_fields(beton: Path) -> None:
    """The .beton must hold an RGB image field 'image' (what `paws convert-dataset imagefolder` writes)."""
    from ffcv.fields import RGBImageField
    from ffcv.reader import Reader

    handlers = Reader(str(beton)).handlers
    if not isinstance(handlers.get("image"), RGBImageField):
        found = ", ".join(f"{k}: {type(v).__name__}" for k, v in handlers.items())
        raise ValueError(
            f"the FFCV file {beton} has no RGB image field 'image' (it has {found}); write it with "
            "`paws convert-dataset imagefolder SRC_DIR OUT.beton`"
        )
