"""Write labelled (and optional validation) split files for an array dataset (``paws make-splits``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from paws_cli.data.arrays import load_array_dataset
from paws_cli.data.splits import make_balanced_split, read_split, write_split

#: Offset between the labelled draw's seed and the validation draw's, so the two use unrelated streams.
VAL_SEED_OFFSET = 1_000_003


def make_splits(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    per_class: int | None = None,
    percent: float | None = None,
    seed: int = 0,
    official: str | os.PathLike[str] | None = None,
    val_per_class: int = 0,
) -> dict[str, Path]:
    """Write ``labelled.txt`` (and ``val.txt`` when ``val_per_class > 0``) into ``out_dir``.

    The labelled set is either a seeded class-balanced draw (``per_class`` or ``percent``) or an official
    index list (``official``, validated against the train-set size). The validation set is a balanced
    draw from the remaining train images, disjoint from the labelled set.
    """
    ds = load_array_dataset(dataset_dir)
    labels = np.asarray(ds.train_labels)
    source = str(ds.root.resolve())
    if official is not None:
        if per_class is not None or percent is not None:
            raise ValueError("give either an official split file or per_class/percent, not both")
        split = read_split(official, num_train=len(labels))
        if split.kind != "index":
            raise ValueError(
                f"official split {official} lists file names, but array dataset {ds.root} needs train indices"
            )
        labelled = np.sort(np.asarray(split.ids, dtype=np.int64))
        fields: dict[str, object] = {"dataset": ds.name, "official": str(Path(official).resolve())}
    else:
        labelled = make_balanced_split(labels, per_class=per_class, percent=percent, seed=seed)
        fields = {"dataset": ds.name}
        fields.update({"per_class": per_class} if per_class is not None else {"percent": percent})
        fields["seed"] = seed
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"labelled": write_split(out / "labelled.txt", labelled, {**fields, "source": source})}
    if val_per_class > 0:
        val_seed = seed + VAL_SEED_OFFSET
        val = make_balanced_split(labels, per_class=val_per_class, seed=val_seed, exclude=labelled)
        val_fields = {"dataset": ds.name, "per_class": val_per_class, "seed": val_seed}
        written["val"] = write_split(
            out / "val.txt",
            val,
            {**val_fields, "role": "val", "disjoint_from": "labelled.txt", "source": source},
        )
    return written
