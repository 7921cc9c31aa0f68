"""SemPPL building blocks on plain tensors: label queues, EMA target helpers, k-NN pseudo-labels."""

from paws_cli.modules.ema import cosine_momentum, make_target, update_momentum
from paws_cli.modules.label_queue import EMPTY, LabelQueue
from paws_cli.modules.pseudo_labels import PseudoLabels, knn_pseudo_labels, sample_semantic_positives

__all__ = [
    "EMPTY",
    "LabelQueue",
    "PseudoLabels",
    "cosine_momentum",
    "knn_pseudo_labels",
    "make_target",
    "sample_semantic_positives",
    "update_momentum",
]
