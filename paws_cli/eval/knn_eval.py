"""`paws knn-eval`: PAWS-NN (soft nearest neighbour) and classic k-NN of a checkpoint's embeddings.

The bank is the labelled subset the run trained with (stored in the checkpoint), embedded with the evaluation
transform, one view, eval mode; queries are the dataset's test split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from paws_cli.config import Settings
from paws_cli.data.arrays import ArrayDataset
from paws_cli.data.augment import eval_transform
from paws_cli.data.pipeline import as_nchw, image_channels, load_dataset
from paws_cli.eval.neighbours import embed_batches, knn_predict, soft_nn_predict, topk_accuracy
from paws_cli.methods import create_method
from paws_cli.methods.base import encoder_of
from paws_cli.train.checkpoint import load_state_strict


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rebuild_model(
    state: dict[str, Any], settings: Settings, dataset: ArrayDataset, source: str
) -> torch.nn.Module:
    """The trained model of a checkpoint, weights loaded strictly."""
    method = create_method(settings, in_chans=image_channels(dataset), num_classes=dataset.num_classes)
    model = method.build_model()
    load_state_strict(model, state["model"], source)
    return model.eval()


def _normalised(images: np.ndarray, dataset: ArrayDataset) -> Tensor:
    return eval_transform(as_nchw(images), dataset.mean, dataset.std)


def evaluate_checkpoint(state: dict[str, Any], settings: Settings, source: str) -> KnnResult:
    dataset = load_dataset(settings.data)
    labelled = state["labelled"].numpy()
    if labelled.max() >= len(dataset.train_labels):
        raise ValueError(
            f"checkpoint {source} labels indices up to {labelled.max()} but {dataset.name} has "
            f"{len(dataset.train_labels)} train images: it was trained on another dataset (check data.*)"
        )
    model = rebuild_model(state, settings, dataset, source)
    encoder = encoder_of(model)
    which = settings.eval.embedding
    if which == "auto":
        which = "prediction" if encoder.prediction is not None else "projection"
    device = torch.device("cpu")
    batch = settings.eval.batch_size

    def embed(x: Tensor) -> Tensor:
        return encoder.embed(x, which)

    bank_images = _normalised(dataset.train_images[labelled], dataset)
    test_images = _normalised(dataset.test_images, dataset)
    bank = embed_batches(embed, bank_images, batch, device=device)
    queries = embed_batches(embed, test_images, batch, device=device)
    bank_labels = torch.as_tensor(np.asarray(dataset.train_labels)[labelled], dtype=torch.long)
    targets = torch.as_tensor(np.asarray(dataset.test_labels), dtype=torch.long)
    ev = settings.eval
    soft = topk_accuracy(
        soft_nn_predict(queries, bank, bank_labels, dataset.num_classes, tau=ev.soft_nn_tau), targets
    )
    knn_k = min(ev.knn_k, len(bank))
    knn = topk_accuracy(
        knn_predict(queries, bank, bank_labels, dataset.num_classes, k=knn_k, temperature=ev.knn_temperature),
        targets,
    )
    result = KnnResult(
        checkpoint=source,
        method=settings.method,
        dataset=dataset.name,
        bank=f"the run's labelled subset: {state.get('labelled_source', f'{len(labelled)} train images')}",
        bank_size=len(labelled),
        queries=len(targets),
        embedding=which,
        embedding_dim=int(bank.shape[1]),
        paws_nn_top1=soft[1],
        paws_nn_top5=soft[5],
        knn_top1=knn[1],
        knn_top5=knn[5],
        knn_k=knn_k,
        knn_temperature=ev.knn_temperature,
        soft_nn_tau=ev.soft_nn_tau,
    )
    classifier = getattr(model, "classifier", None)
    if classifier is not None:
        logits = embed_batches(model, test_images, batch, device=device)
        acc = topk_accuracy(logits, targets)
        result.classifier_top1, result.classifier_top5 = acc[1], acc[5]
    return result


def raw_pixel_soft_nn(dataset: ArrayDataset, labelled: np.ndarray, tau: float = 0.1) -> dict[int, float]:
    """The no-learning baseline: PAWS-NN on normalised raw pixels with the same labelled bank."""
    bank = _normalised(dataset.train_images[labelled], dataset).flatten(1)
    queries = _normalised(dataset.test_images, dataset).flatten(1)
    bank_labels = torch.as_tensor(np.asarray(dataset.train_labels)[labelled], dtype=torch.long)
    targets = torch.as_tensor(np.asarray(dataset.test_labels), dtype=torch.long)
    return topk_accuracy(soft_nn_predict(queries, bank, bank_labels, dataset.num_classes, tau=tau), targets)


def results_path(checkpoint: Path) -> Path:
    return checkpoint.parent / "knn_eval.json"
