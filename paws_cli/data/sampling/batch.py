"""One training step's inputs (:class:`Batch`) and the generator that seeds its augmentations.

Every step's randomness comes from a generator seeded by (run seed, rank, step), so a resumed run sees exactly
the views an uninterrupted one would. Shared by every data back end and every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """A generator for one step's augmentations, a pure function of (seed, rank, step)."""
    words = np.random.SeedSequence([seed, rank, step, 0x9A35]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(((int(words[0]) << 32) | int(words[1])) & (2**63 - 1))
    return generator


@dataclass
class Batch:
    """One training step's inputs, on the training device.

    views: [large 1, large 2, small 1..M] of the unlabelled images, each (B, C, s, s); empty when the
    method uses labelled data only. supports: V views of the support images, each (K*P, C, s, s); empty when
    the method draws no support batch. support_classes: (K*P,) class ids (the same for every support view).
    labels, ids, true_labels: when the method asks for them (``DataNeeds.labels_in_batch``), (B,) the label of
    each image of the batch if it is in the labelled subset, else -1; its index in the train set; and its label
    whether labelled or not, which a method may only use for health signals (pseudo-label accuracy), never to
    train. Otherwise None.
    """

    views: list[Tensor]
    supports: list[Tensor]
    support_classes: Tensor
    labels: Tensor | None = None
    ids: Tensor | None = None
    true_labels: Tensor | None = None


def label_tables(labels: object, labelled: object) -> tuple[Tensor, Tensor]:
    """(true labels, labels as a batch shows them) of every train image: the batch shows an image's label
    inside the labelled subset ``labelled`` (indices) and -1 outside it (``Batch.labels``)."""
    true = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    shown = torch.full_like(true, -1)
    index = torch.as_tensor(np.asarray(labelled), dtype=torch.long)
    shown[index] = true[index]
    return true, shown
