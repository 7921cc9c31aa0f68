"""ImageFolder training data: image files (JPEG, PNG, ...) decoded by PIL in DataLoader workers, the
reference's per-image pipeline.

- The unlabelled images are all images of the train root ``data.path`` (class folders, classes sorted as
  torchvision's ImageFolder sorts them); the labelled subset comes from ``data.split`` (a file-name split,
  resolved to ImageFolder indices by ``paws_cli.data.splits.files.resolve_names``) or a seeded class-balanced draw.
- Batches are chosen in the main process by the shared samplers (``UnlabelledOrder``, ``SupportSampler``: the
  same distributed semantics and checkpointable state as in-memory data) and rendered in DataLoader workers.
- What is served is what the method declares (``DataNeeds``): PAWS's 2 large + M small views and a support batch;
  or a method's own views (``DataNeeds.views``, e.g. SemPPL's L large + S small views with per-view BYOL presets)
  with the labels (-1 outside the labelled subset), ids and true labels of the batch's images, and optionally a
  class-stratified labelled sub-batch drawn by the support sampler (in the support role) and appended to the
  batch with the batch's own views, as the in-memory back end serves it.
- Each view of each sample is made by torchvision's PIL transforms (RandomResizedCrop, flip, colour jitter with
  probability, grayscale, Gaussian blur with sigma ~ U(0.1, 2), solarize/equalize) under torch's RNG seeded from
  (run.seed, rank, step, role, position, view) alone, so views do not depend on the number of workers, on which
  worker made them, or on whether the run was resumed.
- Workers return uint8 tensors; they are moved to the device (pinned, non-blocking on CUDA) and normalised there
  (the same numbers as ToTensor + Normalize, a quarter of the bytes through shared memory).
- Unreadable images (data.bad_images): 'skip' replaces the sample by another sample of the same batch (a support
  by one of its own class when there is one) and counts it; 'stop' raises an error naming the file.
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, ImageFilter
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from paws_cli.config.schema import DataSettings, Settings
from paws_cli.data.augment.views import ViewSpec, view_specs
from paws_cli.data.needs import DataNeeds, needs_of, require_servable
from paws_cli.data.sampling.batch import Batch, label_tables
from paws_cli.data.sampling.samplers import SupportSampler, UnlabelledOrder, build_samplers
from paws_cli.data.splits.files import make_balanced_split, read_split, resolve_names

#: ImageNet channel statistics (in [0, 1]); the reference normalises ImageNet-layout data with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Roles of a sample in a step's batch (part of its seed, so the two never share draws). A labelled sub-batch that
#: joins the batch itself (DataNeeds.labelled_sub_batch) is drawn in the support role.
UNLABELLED, SUPPORT = 0, 1
_SEED_TAG = 0xF01D


# ----------------------------------------------------------------------------------------------- the folder


@dataclass(frozen=True)
class FolderIndex:
    """An ImageFolder root as torchvision sees it: sorted class folders, files in sorted order per class."""

    root: Path
    classes: list[str]
    files: list[str]  # "<class>/<file>", relative to root, in dataset order
    labels: np.ndarray  # int64 class id per file

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        """Absolute path of image ``index``."""
        return os.path.join(self.root, self.files[index])


def scan_image_folder(path: str | os.PathLike[str], *, key: str = "data.path") -> FolderIndex:
    """Index the ImageFolder at ``path`` (``key`` names the setting in messages); clear errors otherwise."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"{key}={root} does not exist; give an ImageFolder root (one folder per class)"
        )
    if not root.is_dir():
        raise NotADirectoryError(
            f"{key}={root} is not a folder; give an ImageFolder root (one folder per class)"
        )
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    if subdirs and set(subdirs) <= {"train", "val", "test"}:
        raise ValueError(
            f"{key}={root} holds the split folders {subdirs}, not class folders; point it at one split, "
            f"e.g. {key}={root / subdirs[0]}"
        )
    if not subdirs:
        raise FileNotFoundError(
            f"{key}={root} has no class folders: expected {root}/<class>/<image> (ImageNet layout)"
        )
    classes, class_to_idx = find_classes(str(root))
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    empty = [os.path.join(root, classes[c]) for c in np.flatnonzero(counts == 0)]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise ValueError(
            f"{len(empty)} class folder(s) of {key}={root} hold no images: {shown}; images need one of the "
            f"extensions {', '.join(IMG_EXTENSIONS)}. Remove the empty folders or add their images"
        )
    files = [os.path.relpath(p, root).replace(os.sep, "/") for p, _ in samples]
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return FolderIndex(root, list(classes), files, labels)


def folder_labelled(cfg: DataSettings, index: FolderIndex) -> tuple[np.ndarray, str]:
    """Sorted ImageFolder indices of the labelled subset, and where they came from (one line)."""
    if cfg.split is not None:
        split = read_split(cfg.split)
        if split.kind != "name":
            raise ValueError(
                f"data.split={cfg.split} lists integer indices, but ImageFolder data is matched by file name "
                "(indices would depend on the folder's order); use a file-name split such as the official lists "
                "or one from `paws make-splits`"
            )
        ids = np.sort(resolve_names(split, index.files, dataset=f"the image folder {index.root}"))
        return ids, f"split file {cfg.split} ({len(ids)} labelled images)"
    ids = make_balanced_split(
        index.labels, per_class=cfg.labels_per_class, percent=cfg.label_percent, seed=cfg.split_seed
    )
    amount = (
        f"{cfg.labels_per_class} per class" if cfg.labels_per_class else f"{cfg.label_percent}% per class"
    )
    return ids, f"seeded class-balanced draw, {amount}, seed {cfg.split_seed} ({len(ids)} labelled images)"


# ----------------------------------------------------------------------------------------------- one view


class RandomPILBlur:
    """With probability ``p``, PIL's Gaussian blur with radius (= sigma) ~ U(sigma range), as the reference.

    Draws come from torch's global RNG (like torchvision's transforms), which the caller seeds per view.
    """

    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        applied = torch.rand(1).item() < self.p
        radius = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(1).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius)) if applied else image


def view_transform(spec: ViewSpec) -> Callable[[Image.Image], Tensor]:
    """The per-image pipeline of one kind of view: PIL RGB image in, uint8 (3, size, size) tensor out.

    Crop, flip, colour jitter (random op order, applied with jitter_p), grayscale, Gaussian blur, solarize,
    equalize, as torchvision's PIL transforms do them (spec section 3); normalisation happens on the device.
    """
    b, c, s, h = spec.jitter_ranges()
    steps: list[Callable[[Any], Any]] = [
        T.RandomResizedCrop(
            spec.size, scale=spec.scale, ratio=spec.ratio, interpolation=T.InterpolationMode.BILINEAR
        ),
        T.RandomHorizontalFlip(spec.flip_p),
        T.RandomApply([T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=spec.jitter_p),
        T.RandomGrayscale(spec.grayscale_p),
        RandomPILBlur(spec.blur_p, spec.blur_sigma),
        T.RandomSolarize(threshold=128, p=spec.solarize_p),  # threshold 0.5 as in the in-memory path
        T.RandomEqualize(p=spec.equalize_p),
        TF.pil_to_tensor,
    ]
    return T.Compose(steps)


def view_seed(seed: int, rank: int, step: int, role: int, position: int, view: int) -> int:
    """The seed of one view: a pure function of where it is used (SeedSequence mixing of the integers)."""
    words = np.random.SeedSequence([_SEED_TAG, seed, rank, step, role, position, view]).generate_state(2)
    return ((int(words[0]) << 32) | int(words[1])) & (2**63 - 1)


def render_views(
    image: Image.Image, transforms: Sequence[Callable[[Image.Image], Tensor]], seeds: Sequence[int]
) -> list[Tensor]:
    """Apply ``transforms[v]`` under torch's RNG seeded with ``seeds[v]``; the caller's RNG state is kept."""
    with torch.random.fork_rng(devices=[]):
        out = []
        for transform, seed in zip(transforms, seeds, strict=True):
            torch.manual_seed(seed)
            out.append(transform(image))
    return out


def decode_rgb(path: str) -> Image.Image:
    """The image at ``path`` fully decoded as RGB (a truncated or corrupt file raises here)."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


# ----------------------------------------------------------------------------------------------- workers


class Key(NamedTuple):
    """One sample of one step's batch: what the samplers chose, and where it goes."""

    role: int
    step: int
    position: int
    image: int


class Sample(NamedTuple):
    """A rendered sample (``views`` None when the image could not be read; ``error`` says why)."""

    key: Key
    label: int
    views: list[Tensor] | None
    path: str
    error: str | None


class FolderViews(Dataset):
    """Map-style dataset over :class:`Key`: decodes the image and renders the views its role needs."""

    def __init__(
        self,
        index: FolderIndex,
        unlabelled: Sequence[ViewSpec],
        support: Sequence[ViewSpec],
        seed: int,
        rank: int,
    ) -> None:
        self.index, self.seed, self.rank = index, seed, rank
        self.transforms = {
            UNLABELLED: [view_transform(s) for s in unlabelled],
            SUPPORT: [view_transform(s) for s in support],
        }

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Key) -> Sample:
        path = self.index.path(key.image)
        label = int(self.index.labels[key.image])
        try:
            image = decode_rgb(path)
        except Exception as exc:  # any decoding failure makes the file unusable; data.bad_images decides
            return Sample(key, label, None, path, f"{type(exc).__name__}: {exc}")
        transforms = self.transforms[key.role]
        seeds = [
            view_seed(self.seed, self.rank, key.step, key.role, key.position, v)
            for v in range(len(transforms))
        ]
        return Sample(key, label, render_views(image, transforms, seeds), path, None)


def _replacement(bad: int, good: list[int], labels: Sequence[int], same_label: bool) -> int:
    """The good position standing in for ``bad``: the next one cyclically (of the same label when asked and
    possible), so the choice depends on the batch alone."""
    candidates = [g for g in good if labels[g] == labels[bad]] if same_label else []
    pool = candidates or good
    after = [g for g in pool if g > bad]
    return after[0] if after else pool[0]


def collate_batch(samples: list[Sample]) -> dict[str, Any]:
    """Stack one step's samples into per-view uint8 tensors, replacing unreadable samples (see module doc).

    Returns views / supports (lists of (n, 3, s, s) uint8), classes, the image ids actually used, the failures
    as (path, error) and ``empty`` naming a role none of whose images could be read.
    """
    out: dict[str, Any] = {"failures": [], "empty": None}
    for role, name in ((UNLABELLED, "unlabelled"), (SUPPORT, "support")):
        part = [s for s in samples if s.key.role == role]
        failed = [i for i, s in enumerate(part) if s.views is None]
        out["failures"] += [(part[i].path, part[i].error) for i in failed]
        good = [i for i, s in enumerate(part) if s.views is not None]
        if part and not good:
            out["empty"] = name
            return out
        labels = [s.label for s in part]
        chosen = [
            i if part[i].views is not None else _replacement(i, good, labels, role == SUPPORT)
            for i in range(len(part))
        ]
        count = len(part[good[0]].views) if part else 0  # type: ignore[arg-type]
        views = [torch.stack([part[i].views[v] for i in chosen]) for v in range(count)]  # type: ignore[index]
        out[f"{name}_views"] = views
        out[f"{name}_ids"] = torch.tensor([part[i].key.image for i in chosen], dtype=torch.long)
        out[f"{name}_classes"] = torch.tensor([part[i].label for i in chosen], dtype=torch.long)
    return out


def check_failures(raw: Mapping[str, Any], bad_images: str, root: Path) -> list[str]:
    """The unreadable files of a collated batch (``collate_batch``'s output), or the error data.bad_images asks
    for: 'stop' names the first file; a role with no readable image at all is an error either way."""
    failures: list[tuple[str, str]] = raw["failures"]
    if failures and bad_images == "stop":
        path, error = failures[0]
        more = f" (and {len(failures) - 1} more in the same batch)" if len(failures) > 1 else ""
        raise ValueError(
            f"cannot read image {path}: {error}{more}. Fix or remove the file, or set data.bad_images=skip "
            "to replace unreadable images by others of the batch"
        )
    if raw["empty"] is not None:
        raise ValueError(
            f"no image of a {raw['empty']} batch could be read (e.g. {failures[0][0]}: {failures[0][1]}); "
            f"check the files under {root}"
        )
    return [path for path, _ in failures]


def collect_before_fork() -> None:
    """Collect garbage before a DataLoader forks its workers.

    A DataLoader that only the garbage collector can free (one caught in a reference cycle, for instance by a
    kept exception's traceback) would otherwise be inherited by the new workers: its finaliser may then run in
    one of them, where it cannot stop its workers ("can only test a child process", seen on a GPU machine),
    while in this process those workers linger until a later collection. Collecting here stops them where they
    were started, before the fork.
    """
    gc.collect()


def worker_init(_: int) -> None:
    # A process-wide PIL switch: truncated files must fail in the workers whatever a parent had set.
    ImageFile.LOAD_TRUNCATED_IMAGES = False


# ----------------------------------------------------------------------------------------------- the back end


class _StepKeys:
    """The DataLoader's batch sampler: per step, the keys of its unlabelled and support samples.

    Iterated in the main process; it advances the shared samplers (which run ahead of training by the
    DataLoader's prefetch, so the data object keeps its own count of batches served for checkpoints).
    """

    def __init__(self, data: FolderTrainData) -> None:
        # A weak reference: a cycle data -> loader -> sampler -> data would keep the DataLoader and its worker
        # processes (and every file descriptor they inherited, such as the run directory's lock) alive after
        # training until the garbage collector happens to run.
        self._data = weakref.ref(data)

    def __iter__(self) -> Iterator[list[Key]]:
        data = self._data()
        if data is None:
            return iter(())
        # The generator must not hold `data` itself: the DataLoader keeps it while prefetching is ahead.
        return self._keys(data.order, data.supports, data.labelled, data.need_unlabelled, data._first_step)

    @staticmethod
    def _keys(
        order: UnlabelledOrder,
        supports: SupportSampler | None,
        labelled: Tensor,
        need_unlabelled: bool,
        step: int,
    ) -> Iterator[list[Key]]:
        picks: Iterable[Tensor | None] = supports if supports is not None else repeat(None)
        for unlabelled, support in zip(order, picks, strict=False):
            keys = []
            if need_unlabelled:
                keys += [Key(UNLABELLED, step, i, int(j)) for i, j in enumerate(unlabelled.tolist())]
            if support is not None:
                images = labelled[support].tolist()
                keys += [Key(SUPPORT, step, i, int(j)) for i, j in enumerate(images)]
            yield keys
            step += 1


class FolderTrainData:
    """Training batches of one process from an ImageFolder (the TrainDataLike protocol of data/sources.py)."""

    def __init__(
        self,
        settings: Settings,
        *,
        device: torch.device,
        world_size: int = 1,
        rank: int = 0,
        needs: DataNeeds | None = None,
        index: FolderIndex | None = None,
    ) -> None:
        needs = needs_of(settings) if needs is None else needs
        require_servable(needs, "folder")
        need_unlabelled = needs.unlabelled_views
        cfg = settings.data
        if cfg.path is None:
            raise ValueError("data.format=folder needs data.path=<the ImageFolder train root>")
        self.settings, self.device, self.rank = settings, device, rank
        self.needs, self.need_unlabelled = needs, need_unlabelled
        self.index = index if index is not None else scan_image_folder(cfg.path)
        self.name, self.num_classes, self.in_chans = "imagefolder", len(self.index.classes), 3
        labelled, self.labelled_description = folder_labelled(cfg, self.index)
        self.labelled = torch.as_tensor(labelled, dtype=torch.long)
        self.order, self.supports = build_samplers(
            self.index.labels,
            labelled,
            needs,
            batch_size=settings.optim.batch_size,
            world_size=world_size,
            rank=rank,
            seed=settings.run.seed,
        )
        # Labels of the train images as the batch shows them: the label inside the labelled subset, else -1.
        self.true_labels, self.batch_labels = label_tables(self.index.labels, labelled)
        aug = settings.augment
        large, small = view_specs(aug)
        if needs.views is not None:
            unlabelled_specs = list(needs.views)
        else:
            unlabelled_specs = [large, large] + ([small] * aug.num_small if small is not None else [])
        # The sub-batch joins the batch: its images get the batch's views.
        support_specs = (
            unlabelled_specs if needs.labelled_sub_batch is not None else [large] * aug.support_views
        )
        self.views = FolderViews(self.index, unlabelled_specs, support_specs, settings.run.seed, rank)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.skipped_images = 0
        self.skipped_files: list[str] = []  # the first few, for the end-of-run report
        self._first_step = 0
        self._served: tuple[int, int] | None = None  # (epoch, batches served) once batches were served
        self._loader: DataLoader | None = None
        #: (unlabelled, support) image indices of the last batch served, after replacements (for tests and logs).
        self.last_ids: tuple[Tensor | None, Tensor] | None = None

    # --- the protocol ---

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    def describe(self) -> str:
        workers = self.settings.data.num_workers
        return (
            f"imagefolder at {self.index.root}: {len(self.index)} train images, {self.num_classes} classes; "
            f"image files decoded by PIL in {workers} DataLoader worker{'s' if workers != 1 else ''} per process"
        )

    def state_dict(self) -> dict[str, Any]:
        """Sampler states at the batches actually served (the DataLoader's prefetch ran the samplers ahead)."""
        samplers = {"unlabelled": self.order.state_dict()}
        if self.supports is not None:
            samplers["supports"] = self.supports.state_dict()
        if self._served is not None:
            for state in samplers.values():
                state["epoch"], state["position"] = self._served
        return {**samplers, "skipped_images": self.skipped_images}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.order.load_state_dict(state["unlabelled"])
        if self.supports is not None:
            self.supports.load_state_dict(state["supports"])
        # Only rank 0 saves checkpoints, so its count is the one stored; other ranks count again from zero.
        self.skipped_images = int(state.get("skipped_images", 0)) if self.rank == 0 else 0
        self._served = None

    def epoch(self, epoch: int, first_step: int) -> Iterator[Batch]:
        """The remaining batches of ``epoch`` (from the position served so far); ``first_step`` is the global
        step of the first one and seeds its views."""
        if self._served is not None:  # rewind the samplers from where prefetching left them
            state = self.state_dict()
            self.order.load_state_dict(state["unlabelled"])
            if self.supports is not None:
                self.supports.load_state_dict(state["supports"])
            self._served = None
        self.order.set_epoch(epoch)
        if self.supports is not None:
            self.supports.set_epoch(epoch)
        start = self.order.position
        if start >= self.steps_per_epoch:  # an epoch already finished rolls over, as the samplers do
            epoch, start = epoch + 1, 0
        self._first_step = first_step
        served = start
        for raw in self._dataloader():
            batch = self._finish(raw)
            served += 1
            self._served = (epoch, served)
            yield batch

    # --- helpers ---

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            collect_before_fork()
            workers = self.settings.data.num_workers
            self._loader = DataLoader(
                self.views,
                batch_sampler=_StepKeys(self),
                num_workers=workers,
                collate_fn=collate_batch,
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0,
                worker_init_fn=worker_init if workers > 0 else None,
            )
        return self._loader

    def _normalise(self, images: Tensor) -> Tensor:
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        return (x - self.mean) * self.inv_std

    def _finish(self, raw: dict[str, Any]) -> Batch:
        """Account for unreadable images (data.bad_images), then move and normalise the views; a labelled
        sub-batch joins the batch, and the batch's labels, ids and true labels are added when the method asks."""
        failed = check_failures(raw, self.settings.data.bad_images, self.index.root)
        self.skipped_images += len(failed)
        self.skipped_files += failed[: max(100 - len(self.skipped_files), 0)]
        views = [self._normalise(v) for v in raw.get("unlabelled_views", [])]
        supports = [self._normalise(v) for v in raw["support_views"]]
        classes = raw["support_classes"].to(self.device, non_blocking=True)
        ids = raw.get("unlabelled_ids")
        self.last_ids = (ids, raw["support_ids"])
        if self.needs.labelled_sub_batch is not None:  # appended to the batch, after its own images
            views = [torch.cat([v, s]) for v, s in zip(views, supports, strict=True)]
            ids = torch.cat([ids, raw["support_ids"]])
            supports, classes = [], torch.empty(0, dtype=torch.long, device=self.device)
        batch = Batch(views, supports, classes)
        if self.needs.labels_in_batch:
            batch.labels = self.batch_labels[ids].to(self.device, non_blocking=True)
            batch.ids = ids.to(self.device, non_blocking=True)
            batch.true_labels = self.true_labels[ids].to(self.device, non_blocking=True)
        return batch
