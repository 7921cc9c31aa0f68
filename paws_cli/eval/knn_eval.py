"""`paws knn-eval`: PAWS-NN (soft nearest neighbour) and classic k-NN of a checkpoint's embeddings.

The bank is the labelled subset the run trained with (stored in the checkpoint; for a released suncet checkpoint,
the subset the given data settings describe), embedded with the evaluation transform, one view, eval mode;
queries are the dataset's test split, or with ``on="val"`` the validation split carved from the train images
outside the labelled subset (:mod:`paws_cli.eval.validation`; for selecting settings without the test set).
Checkpoints are read by `paws_cli.pretrained.load_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from paws_cli.config import Settings
from paws_cli.data.augment.views import eval_transform
from paws_cli.data.backends.eval_data import EvalData, build_eval_data
from paws_cli.data.backends.memory import as_nchw
from paws_cli.data.datasets.arrays import ArrayDataset
from paws_cli.eval.neighbours import embed_batches, knn_predict, soft_nn_predict, topk_accuracy
from paws_cli.eval.validation import check_labels_hidden, validation_view
from paws_cli.io_utils import atomic_write_text
from paws_cli.methods import Method, create_method
from paws_cli.models import PAWSEncoder
from paws_cli.pretrained import PretrainedWeights, load_pretrained, resolve_settings
from paws_cli.train.checkpoint_io import load_state_strict


@dataclass
class KnnResult:
    checkpoint: str
    method: str
    dataset: str
    bank: str
    bank_size: int
    queries: int
    embedding: str
    embedding_dim: int
    paws_nn_top1: float
    paws_nn_top5: float
    knn_top1: float
    knn_top5: float
    knn_k: int
    knn_temperature: float
    soft_nn_tau: float
    classifier_top1: float | None = None
    classifier_top5: float | None = None
    unreadable_images: int = 0  # left out of the bank or the queries (data.bad_images=skip)
    warnings: list[str] = field(default_factory=list)  # e.g. a k larger than the labelled images per class
    queries_from: str = "test split"  # which images were classified ("test split", "val folder ...")
    on: str = "test"  # "test": the test split (or val folder); "val": the train images' validation split

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rebuild_model(
    state: dict[str, Any], settings: Settings, dataset: EvalData, source: str
) -> tuple[torch.nn.Module, Method]:
    """The trained model of a checkpoint (weights loaded strictly) and the method that trained it."""
    method = create_method(settings, in_chans=dataset.in_chans, num_classes=dataset.num_classes)
    model = method.build_model()
    load_state_strict(model, state["model"], source)
    return model.eval(), method


def _normalised(images: np.ndarray, dataset: ArrayDataset) -> Tensor:
    return eval_transform(as_nchw(images), dataset.mean, dataset.std)


def evaluate_checkpoint(
    state: dict[str, Any], settings: Settings, source: str, *, on: str = "test"
) -> KnnResult:
    """Evaluate a toolkit checkpoint's state (as read by ``load_checkpoint``) with its own labelled bank, on the
    test split (``on="test"``) or the validation split (``on="val"``)."""
    dataset = build_eval_data(settings)
    labelled = state["labelled"].numpy()
    if labelled.max() >= len(dataset.train_labels):
        raise ValueError(
            f"checkpoint {source} labels indices up to {labelled.max()} but {dataset.name} has "
            f"{len(dataset.train_labels)} train images: it was trained on another dataset (check data.*)"
        )
    model, method = rebuild_model(state, settings, dataset, source)
    bank = f"the run's labelled subset: {state.get('labelled_source', f'{len(labelled)} train images')}"
    embedder = (method.embedding_encoder(model), method.default_embedding)
    return _evaluate(model, embedder, settings, dataset, labelled, bank, source, on)


def evaluate_pretrained(weights: PretrainedWeights, settings: Settings, *, on: str = "test") -> KnnResult:
    """Evaluate any checkpoint read by ``load_pretrained``.

    A toolkit checkpoint is banked on its own labelled subset; a released suncet checkpoint (no subset stored)
    on the labelled subset that ``settings.data`` describes. A supervised baseline's classifier is scored too.
    """
    source = str(weights.path)
    if weights.kind == "paws" and weights.meta.get("labelled") is not None:
        state = {
            "model": {**{f"encoder.{k}": v for k, v in weights.encoder_state.items()}, **weights.extra_state},
            "labelled": weights.meta["labelled"],
            "labelled_source": weights.meta.get("labelled_source") or "stored in the checkpoint",
        }
        return evaluate_checkpoint(state, settings, source, on=on)
    dataset = build_eval_data(settings)
    if dataset.in_chans != weights.architecture.in_chans:
        raise ValueError(
            f"{source} expects {weights.architecture.in_chans}-channel images but {dataset.name} has "
            f"{dataset.in_chans}; evaluate it on the data it was trained for (check data.*)"
        )
    labelled, description = dataset.labelled(settings.data)
    encoder = weights.build_encoder().eval()  # a released PAWS encoder: evaluated as PAWS evaluates
    return _evaluate(
        encoder,
        (encoder, "auto"),
        settings,
        dataset,
        labelled,
        f"labelled subset from the settings: {description}",
        source,
        on,
    )


def embed_all(
    fns: Sequence[Callable[[Tensor], Tensor]], batches: Iterable[tuple[Tensor, Tensor]]
) -> tuple[list[Tensor], Tensor]:
    """Each of ``fns`` over every batch of (images, labels) in one pass: ([(N, D_f) per fn], labels (N,))."""
    outs: list[list[Tensor]] = [[] for _ in fns]
    labels = []
    for images, y in batches:
        for out, fn in zip(outs, fns, strict=True):
            out.append(embed_batches(fn, images, len(images)))
        labels.append(y)
    if not labels:
        raise ValueError("there are no images to embed (all were unreadable, or none was selected)")
    return [torch.cat(out) for out in outs], torch.cat(labels)


def _evaluate(
    model: torch.nn.Module,
    embedder: tuple[PAWSEncoder, str],
    settings: Settings,
    dataset: EvalData,
    labelled: np.ndarray,
    bank_description: str,
    source: str,
    on: str = "test",
) -> KnnResult:
    if on == "val":
        check_labels_hidden(settings)
        dataset = validation_view(dataset, labelled, settings.eval)
    elif on != "test":
        raise ValueError(f"evaluate on 'test' or 'val', not {on!r}")
    # The method says which encoder and which of its outputs evaluation embeds with (eval.embedding=auto).
    encoder, default = embedder
    which = settings.eval.embedding if settings.eval.embedding != "auto" else default
    if which == "auto":
        which = "prediction" if encoder.prediction is not None else "projection"
    batch = settings.eval.batch_size

    def embed(x: Tensor) -> Tensor:
        return encoder.embed(x, which)

    # One pass over each image set (folder data decodes JPEGs); the classifier, if any, scores the same batches.
    classifier = getattr(model, "classifier", None)
    (bank,), bank_labels = embed_all([embed], dataset.train_batches(labelled, batch))
    query_fns = [embed, model] if classifier is not None else [embed]
    query_outputs, targets = embed_all(query_fns, dataset.query_batches(batch))
    queries = query_outputs[0]
    ev = settings.eval
    soft = topk_accuracy(
        soft_nn_predict(queries, bank, bank_labels, dataset.num_classes, tau=ev.soft_nn_tau), targets
    )
    knn_k = min(ev.knn_k, len(bank))
    warnings = knn_k_warnings(ev.knn_k, bank_labels.numpy(), dataset.num_classes)
    knn = topk_accuracy(
        knn_predict(queries, bank, bank_labels, dataset.num_classes, k=knn_k, temperature=ev.knn_temperature),
        targets,
    )
    result = KnnResult(
        checkpoint=source,
        method=settings.method,
        dataset=dataset.name,
        bank=bank_description,
        bank_size=len(bank_labels),
        queries=len(targets),
        queries_from=dataset.queries_name,
        on=on,
        embedding=which,
        embedding_dim=int(bank.shape[1]),
        paws_nn_top1=soft[1],
        paws_nn_top5=soft[5],
        knn_top1=knn[1],
        knn_top5=knn[5],
        knn_k=knn_k,
        knn_temperature=ev.knn_temperature,
        soft_nn_tau=ev.soft_nn_tau,
        unreadable_images=len(dataset.dropped),
        warnings=warnings,
    )
    if classifier is not None:
        acc = topk_accuracy(query_outputs[1], targets)
        result.classifier_top1, result.classifier_top5 = acc[1], acc[5]
    return result


def knn_k_warnings(k: int, bank_labels: np.ndarray, num_classes: int) -> list[str]:
    """What is wrong with k-NN's ``k`` for this bank: more neighbours than images of a class, or than the bank."""
    counts = np.bincount(bank_labels, minlength=num_classes)
    present = counts[counts > 0]
    out = []
    if len(bank_labels) < k:
        out.append(
            f"eval.knn_k={k} exceeds the {len(bank_labels)} labelled images of the bank: k-NN uses k={len(bank_labels)}"
        )
    if len(present) and k > present.min():
        fewest = int(present.min())
        out.append(
            f"eval.knn_k={k} exceeds the labelled images per class ({fewest}"
            + (f" to {int(present.max())}" if present.max() != fewest else "")
            + f"): every k-NN vote counts neighbours of other classes; pass eval.knn_k={fewest} or less "
            "to compare like with like (PAWS-NN weighs the whole bank and is not affected)"
        )
    return out


def raw_pixel_soft_nn(dataset: ArrayDataset, labelled: np.ndarray, tau: float = 0.1) -> dict[int, float]:
    """The no-learning baseline: PAWS-NN on normalised raw pixels with the same labelled bank."""
    bank = _normalised(dataset.train_images[labelled], dataset).flatten(1)
    queries = _normalised(dataset.test_images, dataset).flatten(1)
    bank_labels = torch.as_tensor(np.asarray(dataset.train_labels)[labelled], dtype=torch.long)
    targets = torch.as_tensor(np.asarray(dataset.test_labels), dtype=torch.long)
    return topk_accuracy(soft_nn_predict(queries, bank, bank_labels, dataset.num_classes, tau=tau), targets)


def results_path(checkpoint: Path, on: str = "test") -> Path:
    """Default results file beside the checkpoint: knn_eval.json (test split), knn_eval_val.json (validation)."""
    return checkpoint.parent / ("knn_eval_val.json" if on == "val" else "knn_eval.json")


def knn_table(result: KnnResult) -> Table:
    """PAWS-NN, k-NN (and the supervised baseline's classifier) top-1/top-5 as a rich table."""
    on = " on the validation split" if result.on == "val" else ""
    table = Table(title=f"knn-eval of {result.checkpoint}{on}")
    for col in ("classifier", "top-1 %", "top-5 %"):
        table.add_column(col, justify="right" if col != "classifier" else "left")
    table.add_row(
        f"PAWS-NN (soft NN, tau {result.soft_nn_tau})",
        f"{result.paws_nn_top1:.2f}",
        f"{result.paws_nn_top5:.2f}",
    )
    table.add_row(
        f"k-NN (k {result.knn_k}, T {result.knn_temperature})",
        f"{result.knn_top1:.2f}",
        f"{result.knn_top5:.2f}",
    )
    if result.classifier_top1 is not None:
        table.add_row(
            "linear classifier (supervised)", f"{result.classifier_top1:.2f}", f"{result.classifier_top5:.2f}"
        )
    return table


def knn_eval_command(
    checkpoint: Path,
    recipe: str | None,
    overrides: Sequence[str],
    *,
    output: Path | None,
    console: Console,
    environ: Mapping[str, str] | None = None,
    on: str = "test",
) -> KnnResult:
    """`paws knn-eval CHECKPOINT [--recipe R] [key=value ...]` for toolkit and released suncet checkpoints.

    Settings: the checkpoint's < recipe < environment < overrides (architecture from the checkpoint). A released
    checkpoint carries no settings: the data must come from --recipe or data.* overrides. ``on="val"`` classifies
    the validation split (eval.val_images train images outside the labelled subset) instead of the test split.
    """
    if on not in ("test", "val"):
        raise ValueError(f"--on must be test or val, got {on!r}")
    weights = load_pretrained(checkpoint)
    settings, notes = resolve_settings(weights, recipe, overrides, environ=environ)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    result = evaluate_pretrained(weights, settings, on=on)
    console.print(
        f"dataset {result.dataset}; bank: {result.bank}; queries: {result.queries} images of the "
        f"{result.queries_from}; "
        f"embedding: {result.embedding} ({result.embedding_dim}-d)"
    )
    for warning in result.warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
    console.print(knn_table(result))
    out = output or results_path(checkpoint, on)
    atomic_write_text(out, json.dumps(result.as_dict(), indent=2) + "\n")
    console.print(f"results: {out}")
    return result
