"""PAWS batch samplers: the class-stratified support sampler and the unlabelled batch order.

Every random draw comes from a fresh ``torch.Generator`` seeded from integers such as (seed, epoch, rank,
class), never from hidden global RNG state. A batch is therefore a pure function of the configuration and
(epoch, position), so a resumed run reproduces exactly the batches an uninterrupted run would have seen
(the reference implementation does not restore its sampler on resume; see spec section 9).
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from paws_cli.data.needs import DataNeeds

# Stream tags keep the seeds of unrelated draws apart even when their other integers coincide.
_CLASS_PERM, _CLASS_SHARD, _CLASS_QUEUE, _UNLABELLED = 1, 2, 3, 4


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by hashing the non-negative integers ``parts`` (SeedSequence mixing)."""
    words = np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & (2**63 - 1))


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as an int, or raise a ValueError naming ``name`` when it is not an int >= minimum."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got the boolean {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


class _EpochCursor:
    """(epoch, position) bookkeeping shared by both samplers, with the same resume semantics."""

    _what = "sampler"
    epoch: int
    position: int
    world_size: int

    def _num_steps(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._num_steps()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. Position restarts at 0 unless ``epoch`` is already the current one,
        so calling set_epoch right after load_state_dict keeps the resume position."""
        epoch = _check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _begin(self) -> tuple[int, int]:
        # A finished epoch rolls over to the next one, so forgetting set_epoch never repeats batches.
        if self.position >= self._num_steps():
            self.epoch, self.position = self.epoch + 1, 0
        return self.epoch, self.position

    def _advance(self, epoch: int, position: int) -> None:
        # Only the iterator of the current epoch may move the cursor (set_epoch may have run meanwhile).
        if self.epoch == epoch:
            self.position = position

    #: Settings counted per process; they may change on resume when the world size changes with them.
    _per_process_keys: tuple[str, ...] = ()

    def _global_sizes(self, fields: Mapping[str, Any], world_size: int) -> dict[str, int]:
        """What one step draws over all processes, from a state's (or this sampler's) per-process fields."""
        raise NotImplementedError

    def _check_world_change(self, state: Mapping[str, Any], expected: dict[str, int]) -> dict[str, int]:
        """Accept another world size when the global batch stays the same; return what is left to compare.

        The samplers cut global batches (unlabelled images, support classes) that depend on the global
        sizes only, so a cursor saved with W processes means the same position with W' processes.
        """
        saved_world = _check_int(f"{self._what} state field 'world_size'", state["world_size"], 1)
        if saved_world == self.world_size:
            return expected
        for key in self._per_process_keys:
            if key not in state:
                raise ValueError(f"{self._what} state is missing the field {key!r}; it is not a saved state")
        saved = self._global_sizes(state, saved_world)
        mine = self._global_sizes(self.state_dict(), self.world_size)
        if saved != mine:
            differ = "; ".join(
                f"{k}: saved {saved[k]}, this run {mine[k]}" for k in mine if saved[k] != mine[k]
            )
            raise ValueError(
                f"{self._what} state was saved with world_size={saved_world} but this run has "
                f"world_size={self.world_size}, and the global batch differs ({differ}); resuming with "
                f"another global batch is not supported yet: resume with {saved_world} processes, or scale "
                f"the per-process sizes ({', '.join(self._per_process_keys)}) so the global batch stays the same"
            )
        return {k: v for k, v in expected.items() if k not in self._per_process_keys}

    def _load_cursor(self, state: Mapping[str, Any], expected: Mapping[str, int]) -> None:
        """Check ``state`` against this sampler's configuration, then take its epoch and position."""
        if not isinstance(state, Mapping):
            raise ValueError(f"{self._what} state must be a dict, got {type(state).__name__}")
        for key in (*expected, "world_size", "epoch", "position"):
            if key not in state:
                raise ValueError(f"{self._what} state is missing the field {key!r}; it is not a saved state")
        expected = self._check_world_change(state, dict(expected))
        for key, mine in expected.items():
            if state[key] != mine:
                raise ValueError(
                    f"{self._what} state has {key}={state[key]} but this run has {key}={mine}; "
                    "resume with the same settings and data as the saved run"
                )
        epoch = _check_int(f"{self._what} state field 'epoch'", state["epoch"], 0)
        position = _check_int(f"{self._what} state field 'position'", state["position"], 0)
        if position > self._num_steps():
            raise ValueError(
                f"{self._what} state has position={position}, "
                f"beyond the {self._num_steps()} batches of an epoch"
            )
        self.epoch, self.position = epoch, position


class _ClassQueue:
    """Without-replacement stream over one class's candidate images, reshuffled each time it runs dry.

    Pass j is the candidates permuted by a generator seeded from seed_parts + (j,), except that images a
    take already got from the end of pass j - 1 are moved (in shuffled order) to the back of pass j: a take
    of count <= len(candidates) images is then pairwise distinct, and the stream is still a chain of full
    passes, so every image is used k times before any is used k + 2 times. A pass depends on the take that
    crossed into it, so resuming replays the takes (``skip``) rather than jumping a counter.
    """

    def __init__(self, candidates: torch.Tensor, seed_parts: tuple[int, ...]) -> None:
        self.candidates, self.seed_parts = candidates, seed_parts
        # Starting at the end of pass -1 lets the first take draw pass 0 through the ordinary path.
        self._cycle, self._order, self._offset = -1, candidates, len(candidates)

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` images of the stream, pairwise distinct when ``count <= len(candidates)``."""
        n, start = len(self.candidates), self._offset
        if count > n:
            raise ValueError(
                f"cannot take {count} distinct images from a class with only {n} candidates; "
                "lower the method's images_per_class (e.g. paws.images_per_class)"
            )
        if start + count <= n:
            self._offset += count
            return self._order[start : self._offset]
        head = self._order[start:]
        self._cycle += 1
        order = self.candidates[torch.randperm(n, generator=_generator(*self.seed_parts, self._cycle))]
        used = torch.isin(order, head)  # stable partition: this take's images go last
        self._order = torch.cat([order[~used], order[used]])
        self._offset = count - len(head)
        return torch.cat([head, self._order[: self._offset]])

    def skip(self, count: int) -> None:
        """Advance the stream exactly as ``take(count)`` would, without keeping the images."""
        if self._offset + count <= len(self.candidates):
            self._offset += count  # the common case needs no tensor work
        else:
            self.take(count)


class SupportSampler(_EpochCursor):
    """Class-stratified batches of indices into the labelled subset (spec section 2).

    Each batch holds ``images_per_class`` (P) images of each of ``classes_per_batch`` (K) classes, laid out
    as P rounds of one image per class: ``[c1_img1, ..., cK_img1, c1_img2, ...]``. With
    ``unique_classes_per_rank`` the W processes take disjoint class chunks (K*W distinct classes per step);
    otherwise they share the K classes and draw from disjoint shards of each class's images.
    """

    _what = "support sampler"
    _per_process_keys = ("classes_per_batch", "images_per_class")

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        *,
        classes_per_batch: int,
        images_per_class: int,
        batches_per_epoch: int,
        world_size: int = 1,
        rank: int = 0,
        unique_classes_per_rank: bool = True,
        seed: int = 0,
        section: str = "paws",
    ) -> None:
        # section: the settings section holding the support shape, so that errors name the keys to change.
        self.section = section
        self.classes_per_batch = _check_int(f"{section}.classes_per_batch", classes_per_batch, 1)
        self.images_per_class = _check_int(f"{section}.images_per_class", images_per_class, 1)
        self.batches_per_epoch = _check_int("batches_per_epoch", batches_per_epoch, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.seed = _check_int("seed", seed, 0)
        self.unique_classes_per_rank = bool(unique_classes_per_rank)
        self.epoch, self.position = 0, 0

        array = np.asarray(labels)
        if array.size == 0:
            raise ValueError(
                "support sampler got no labels: the labelled subset is empty; check the label split"
            )
        if array.ndim != 1 or array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"labels must be a 1-D sequence of integer class ids, got shape {array.shape} "
                f"of dtype {array.dtype}"
            )
        if array.min() < 0:
            raise ValueError(f"labels must be non-negative class ids, found {int(array.min())}")
        array = array.astype(np.int64)
        self._labels = torch.from_numpy(array.copy())
        self._labels_crc32 = zlib.crc32(np.ascontiguousarray(array).tobytes())

        # Stable sort groups each class's indices in increasing order, so candidates do not depend on hashing.
        order = np.argsort(array, kind="stable")
        classes, counts = np.unique(array, return_counts=True)
        self._classes = torch.from_numpy(classes)
        self._class_images = {
            int(c): torch.from_numpy(chunk)
            for c, chunk in zip(classes, np.split(order, np.cumsum(counts)[:-1]), strict=True)
        }
        self._validate_counts(classes, counts)
        self._group_size = self.classes_per_batch * (self.world_size if self.unique_classes_per_rank else 1)
        self._groups_per_perm = len(classes) // self._group_size
        self._perm_cache: tuple[tuple[int, int], torch.Tensor] | None = None

    def _validate_counts(self, classes: np.ndarray, counts: np.ndarray) -> None:
        K, P, W, C = self.classes_per_batch, self.images_per_class, self.world_size, len(classes)
        if self.unique_classes_per_rank and K * W > C:
            raise ValueError(
                f"support needs classes_per_batch x world_size = {K} x {W} = {K * W} distinct classes per "
                f"step, but the labelled subset has only {C} classes; lower {self.section}.classes_per_batch to "
                f"at most {C // W} or turn off {self.section}.unique_classes_per_rank"
            )
        if K > C:
            raise ValueError(
                f"{self.section}.classes_per_batch={K} exceeds the {C} classes present in the labelled subset; "
                f"lower it to at most {C}"
            )
        # Per process, a class offers all its images (unique classes) or its smallest shard, n // W.
        per_rank = counts if self.unique_classes_per_rank else counts // W
        worst = int(np.argmin(per_rank))
        if per_rank[worst] < P:
            raise ValueError(
                f"class {int(classes[worst])} has {int(counts[worst])} labelled images, i.e. "
                f"{int(per_rank[worst])} per process with world_size={W}, fewer than "
                f"{self.section}.images_per_class={P}; lower {self.section}.images_per_class or use more labels"
            )

    def _num_steps(self) -> int:
        return self.batches_per_epoch

    def _batch_classes(self, epoch: int, index: int) -> torch.Tensor:
        """This rank's K class ids for batch ``index`` of ``epoch``, in batch order."""
        perm_index, slot = divmod(index, self._groups_per_perm)
        key = (epoch, perm_index)
        if self._perm_cache is None or self._perm_cache[0] != key:
            gen = _generator(_CLASS_PERM, self.seed, epoch, perm_index)
            self._perm_cache = (key, self._classes[torch.randperm(len(self._classes), generator=gen)])
        # Classes left over at the end of a permutation are dropped: a group never spans two permutations.
        group = self._perm_cache[1][slot * self._group_size : (slot + 1) * self._group_size]
        if self.unique_classes_per_rank:
            K = self.classes_per_batch
            group = group[self.rank * K : (self.rank + 1) * K]
        return group

    def _queue(self, queues: dict[int, _ClassQueue], epoch: int, cls: int) -> _ClassQueue:
        if cls not in queues:
            images = self._class_images[cls]
            if not self.unique_classes_per_rank:
                # The same shuffle on every rank, then a strided cut: the ranks' shards are disjoint.
                gen = _generator(_CLASS_SHARD, self.seed, epoch, cls)
                images = images[torch.randperm(len(images), generator=gen)][self.rank :: self.world_size]
            queues[cls] = _ClassQueue(images, (_CLASS_QUEUE, self.seed, epoch, self.rank, cls))
        return queues[cls]

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yield the remaining batches of the current epoch as LongTensors of K*P labelled-subset indices."""
        epoch, start = self._begin()
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        P = self.images_per_class
        queues: dict[int, _ClassQueue] = {}
        # Resume: replay the queue draws of the batches already served (indices only, no tensors kept), so
        # every queue reaches the exact state of an uninterrupted run, reshuffles included.
        for index in range(start):
            for cls in self._batch_classes(epoch, index).tolist():
                self._queue(queues, epoch, cls).skip(P)
        for index in range(start, self.batches_per_epoch):
            classes = self._batch_classes(epoch, index).tolist()
            picks = torch.stack([self._queue(queues, epoch, cls).take(P) for cls in classes])  # (K, P)
            self._advance(epoch, index + 1)
            yield picks.t().reshape(-1)

    def batch_labels(self, batch: torch.Tensor) -> torch.Tensor:
        """Class ids (LongTensor) of the labelled-subset indices in ``batch``."""
        return self._labels[torch.as_tensor(batch, dtype=torch.long)]

    def state_dict(self) -> dict[str, int]:
        """Plain-int state; ``position`` counts batches already yielded in ``epoch``.

        With a prefetching DataLoader the sampler runs ahead of training: a trainer should overwrite
        ``position`` with the number of steps it actually trained in the epoch before saving.
        """
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "rank": self.rank,
            "classes_per_batch": self.classes_per_batch,
            "images_per_class": self.images_per_class,
            "batches_per_epoch": self.batches_per_epoch,
            "unique_classes_per_rank": int(self.unique_classes_per_rank),
            "num_labels": len(self._labels),
            "labels_crc32": self._labels_crc32,
        }

    def _global_sizes(self, fields: Mapping[str, Any], world_size: int) -> dict[str, int]:
        K, P = int(fields["classes_per_batch"]), int(fields["images_per_class"])
        if fields["unique_classes_per_rank"]:
            return {"classes per step": K * world_size, "images per class": P}
        return {"classes per step": K, "images per class": P * world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``'s (epoch, position). The saved rank may differ (the state is rank-independent),
        and so may the world size when the global support stays the same (classes per step and images per
        class over all processes); any other differing setting or label set raises a ValueError naming it."""
        self._load_cursor(state, {k: v for k, v in self.state_dict().items() if k not in _CURSOR_KEYS})

    def describe(self) -> str:
        """One line summarising the per-step support."""
        K, P, W = self.classes_per_batch, self.images_per_class, self.world_size
        distinct = K * W if self.unique_classes_per_rank else K
        return (
            f"support: {K} classes x {P} images per process, {W} process{'es' if W > 1 else ''} -> "
            f"{K * P * W} global supports ({distinct} distinct classes) per step"
        )


# Fields that describe where iteration stands rather than what is being iterated.
_CURSOR_KEYS = frozenset({"epoch", "position", "rank", "world_size"})


class UnlabelledOrder(_EpochCursor):
    """Per-rank batches of unlabelled-image indices.

    Each epoch draws a permutation of all images from (seed, epoch), identical on every rank, cuts it into
    global batches of ``batch_size * world_size`` and gives rank r the contiguous slice
    ``[r * batch_size, (r + 1) * batch_size)`` of each. Without ``drop_last`` the last global batch is
    completed with images from the start of the permutation, so every rank always gets full batches.
    """

    _what = "unlabelled order"
    _per_process_keys = ("batch_size",)

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        self.num_images = _check_int("num_images", num_images, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.seed = _check_int("seed", seed, 0)
        self.drop_last = bool(drop_last)
        self.epoch, self.position = 0, 0
        global_batch = self.batch_size * self.world_size
        if self.num_images < global_batch:
            raise ValueError(
                f"the unlabelled set has {self.num_images} images, fewer than one global batch of "
                f"batch_size x world_size = {self.batch_size} x {self.world_size} = {global_batch}; "
                "lower the batch size or use more images"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank and epoch."""
        global_batch = self.batch_size * self.world_size
        return -(-self.num_images // global_batch) if not self.drop_last else self.num_images // global_batch

    def _num_steps(self) -> int:
        return self.steps_per_epoch

    def epoch_permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The permutation of all images for ``epoch`` (default: the current one), same on every rank."""
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        return torch.randperm(self.num_images, generator=_generator(_UNLABELLED, self.seed, epoch))

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yield this rank's remaining batches of the current epoch as LongTensors of batch_size indices."""
        epoch, start = self._begin()
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        B, global_batch = self.batch_size, self.batch_size * self.world_size
        perm = self.epoch_permutation(epoch)
        shortfall = self.steps_per_epoch * global_batch - self.num_images
        if shortfall > 0:
            perm = torch.cat([perm, perm[:shortfall]])
        for step in range(start, self.steps_per_epoch):
            offset = step * global_batch + self.rank * B
            self._advance(epoch, step + 1)
            yield perm[offset : offset + B]

    def state_dict(self) -> dict[str, int]:
        """Plain-int state; ``position`` counts batches already yielded in ``epoch``."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_images": self.num_images,
            "batch_size": self.batch_size,
            "drop_last": int(self.drop_last),
        }

    def _global_sizes(self, fields: Mapping[str, Any], world_size: int) -> dict[str, int]:
        return {"global batch": int(fields["batch_size"]) * world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``'s (epoch, position); the world size may differ when batch_size x world_size
        stays the same; a differing setting raises a ValueError naming it."""
        self._load_cursor(state, {k: v for k, v in self.state_dict().items() if k not in _CURSOR_KEYS})


def build_samplers(
    labels: np.ndarray,
    labelled: np.ndarray,
    needs: DataNeeds,
    *,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
) -> tuple[UnlabelledOrder, SupportSampler | None]:
    """The unlabelled order over all ``labels`` and, when the method asks for one, the class-stratified sampler
    over the ``labelled`` subset (PAWS's support batch or SemPPL's labelled sub-batch): every back end's."""
    order = UnlabelledOrder(len(labels), batch_size, world_size=world_size, rank=rank, seed=seed)
    shape = needs.support or needs.labelled_sub_batch
    if shape is None:
        return order, None
    supports = SupportSampler(
        np.asarray(labels)[labelled],
        classes_per_batch=shape.classes_per_batch,
        images_per_class=shape.images_per_class,
        batches_per_epoch=order.steps_per_epoch,
        world_size=world_size,
        rank=rank,
        unique_classes_per_rank=shape.unique_classes_per_rank,
        seed=seed,
        section=shape.section,
    )
    return order, supports
