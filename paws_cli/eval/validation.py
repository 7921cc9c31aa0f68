"""The validation split: held-out train images that select settings (`knn-eval --on val`, `paws sweep`).

Choosing settings by their test accuracy would report an optimistic test number. The validation queries are
therefore carved from the train split: ``eval.val_images // classes`` images per class, a seeded draw
(``eval.val_seed``) among the train images outside the run's labelled subset. Those images belong to the unlabelled
pool, whose labels training never reads, so scoring them is a fair stand-in for the test set; the test images are
never read. Evaluation is otherwise the same as on the test split (same bank, embedding and classifiers).

Works for every evaluation back end (in-memory arrays and ImageFolder train roots), since it only needs the train
labels and the train images by index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from paws_cli.config.schema import DataSettings, EvalSettings, Settings
from paws_cli.data.backends.eval_data import Batches, EvalData
from paws_cli.data.splits.files import make_balanced_split

__all__ = ["ValidationQueries", "check_labels_hidden", "validation_indices", "validation_view"]


def validation_indices(
    train_labels: np.ndarray, labelled: np.ndarray, *, num_classes: int, val_images: int, seed: int
) -> np.ndarray:
    """Sorted int64 indices of ``val_images // num_classes`` train images per class, none of them in ``labelled``.

    Deterministic for (labels, labelled subset, count, seed). Raises ValueError naming ``eval.val_images`` when a
    class has too few images outside the labelled subset.
    """
    labels = np.asarray(train_labels, dtype=np.int64)
    per_class = val_images // num_classes
    if per_class < 1:
        raise ValueError(
            f"eval.val_images={val_images} is fewer than one image per class ({num_classes} classes); "
            f"set eval.val_images to at least {num_classes}"
        )
    if len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(
            f"train labels go up to {int(labels.max())} but the dataset has {num_classes} classes"
        )
    try:
        return make_balanced_split(
            labels, per_class=per_class, seed=seed, exclude=np.asarray(labelled, dtype=np.int64)
        )
    except ValueError as exc:
        raise ValueError(
            f"cannot carve a validation split of eval.val_images={val_images} ({per_class} per class) from the "
            f"train images outside the labelled subset: {exc}. Lower eval.val_images"
        ) from None


class ValidationQueries(EvalData):
    """``base`` with the validation images of its train split as queries; everything else is ``base``'s."""

    def __init__(self, base: EvalData, ids: np.ndarray, seed: int) -> None:
        super().__init__()
        self.base, self.ids = base, np.asarray(ids, dtype=np.int64)
        self.name, self.num_classes, self.in_chans = base.name, base.num_classes, base.in_chans
        self.train_labels = base.train_labels
        self.dropped = base.dropped  # one list: unreadable images of either stream are counted once
        per_class = len(self.ids) // max(base.num_classes, 1)
        self.queries_name = (
            f"validation split ({len(self.ids)} train images outside the labelled subset, {per_class} per "
            f"class, seed {seed})"
        )

    @property
    def query_labels(self) -> np.ndarray:
        return np.asarray(self.train_labels, dtype=np.int64)[self.ids]

    def describe(self) -> str:
        return self.base.describe()

    def labelled(self, cfg: DataSettings) -> tuple[np.ndarray, str]:
        return self.base.labelled(cfg)

    def train_batches(self, indices: Sequence[int] | np.ndarray, batch_size: int) -> Batches:
        return self.base.train_batches(indices, batch_size)

    def query_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Batches:
        return self.base.train_batches(self.ids[rank::world_size], batch_size)


def validation_view(dataset: EvalData, labelled: np.ndarray, cfg: EvalSettings) -> ValidationQueries:
    """``dataset`` with the validation split of ``labelled``'s complement (eval.val_images, eval.val_seed) as
    queries."""
    ids = validation_indices(
        dataset.train_labels,
        labelled,
        num_classes=dataset.num_classes,
        val_images=cfg.val_images,
        seed=cfg.val_seed,
    )
    return ValidationQueries(dataset, ids, cfg.val_seed)


def check_labels_hidden(settings: Settings) -> None:
    """Refuse settings whose training reads the labels of unlabelled images (they would leak into validation)."""
    section = settings.method_settings
    if getattr(section, "pseudo_labels", None) == "oracle":
        raise ValueError(
            f"{settings.method}.pseudo_labels=oracle trains with the true labels of the unlabelled images, so the "
            "validation split (carved from them) would not be held out; validate runs with pseudo_labels=knn"
        )
