"""Per-large-view FIFO queues of labelled target projections for SemPPL (SEMPPL-SPEC.md 6.1, 8, 12).

Queue j holds the unit target vectors t_j of recently seen *labelled* images, their labels and their global
sample ids. Empty slots carry label -1 and id -1; the k-NN and the positive sampler ignore them (6.1:
"Initialisation", recommended empty start).

This is deliberately a plain object rather than an ``nn.Module``: as a submodule of a DDP-wrapped model its
buffers would be broadcast from rank 0 at every forward (hundreds of MB at ImageNet scale), and parameter or
buffer walks (EMA, optimiser groups) would have to skip it. Every rank enqueues the same all-gathered tensors,
so the copies stay identical without communication; checkpoints save ``state_dict()`` explicitly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: Label (and id) of a slot that holds nothing yet.
EMPTY = -1


class LabelQueue:
    """L ring buffers of (unit vector, label, sample id) sharing one write pointer.

    Attributes:
        vectors: (L, N_q, D) unit vectors (zeros where empty), in ``dtype``.
        labels: (L, N_q) long class ids, -1 where empty.
        ids: (L, N_q) long global sample ids, -1 where empty.
        ptr: the next slot to write, in [0, N_q).
    """

    def __init__(
        self,
        num_queues: int,
        size: int,
        dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for name, value in (("num_queues", num_queues), ("size", size), ("dim", dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.vectors = torch.zeros(num_queues, size, dim, device=device, dtype=dtype)
        self.labels = torch.full((num_queues, size), EMPTY, device=device, dtype=torch.long)
        self.ids = torch.full((num_queues, size), EMPTY, device=device, dtype=torch.long)
        self.ptr = 0

    @property
    def num_queues(self) -> int:
        return self.vectors.shape[0]

    @property
    def size(self) -> int:
        return self.vectors.shape[1]

    @property
    def dim(self) -> int:
        return self.vectors.shape[2]

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    def to(self, device: torch.device | str) -> LabelQueue:
        """Move the buffers in place (like ``nn.Module.to``) and return self."""
        self.vectors = self.vectors.to(device)
        self.labels = self.labels.to(device)
        self.ids = self.ids.to(device)
        return self

    @torch.no_grad()
    def enqueue(self, vectors: Tensor, labels: Tensor, ids: Tensor) -> None:
        """Write n items into every queue at the pointer, wrapping around; queue j receives ``vectors[j]``.

        The result equals writing the items one by one: with n > N_q only the last N_q survive, and the pointer
        still advances by n (mod N_q). Vectors are L2-normalised (in float32) before they are stored. Labels
        must be >= 0 (a -1 would mark the slot empty); they are not checked to avoid a device synchronisation.
        """
        if vectors.dim() != 3 or vectors.shape[0] != self.num_queues or vectors.shape[2] != self.dim:
            raise ValueError(
                f"vectors must have shape (L={self.num_queues}, n, D={self.dim}), got {tuple(vectors.shape)}"
            )
        if labels.shape != (vectors.shape[1],) or ids.shape != (vectors.shape[1],):
            raise ValueError(
                f"labels and ids must have shape (n={vectors.shape[1]},), "
                f"got {tuple(labels.shape)} and {tuple(ids.shape)}"
            )
        n = vectors.shape[1]
        if n == 0:
            return
        # Items overwritten within this very call are dropped up front: one index_put with repeated indices
        # has no defined winner on CUDA, so every written slot must be distinct.
        skip = max(0, n - self.size)
        slots = (self.ptr + skip + torch.arange(n - skip, device=self.device)) % self.size
        unit = F.normalize(vectors[:, skip:].detach().float(), dim=-1)
        self.vectors[:, slots] = unit.to(device=self.device, dtype=self.vectors.dtype)
        self.labels[:, slots] = labels[skip:].to(device=self.device, dtype=torch.long)
        self.ids[:, slots] = ids[skip:].to(device=self.device, dtype=torch.long)
        self.ptr = (self.ptr + n) % self.size

    def classes_present(self, queue: int | None = None) -> Tensor:
        """Sorted distinct labels held by queue ``queue`` (all queues when None), empty slots excluded."""
        labels = self.labels if queue is None else self.labels[queue]
        return torch.unique(labels[labels != EMPTY])

    def num_filled(self) -> Tensor:
        """(L,) number of non-empty slots per queue."""
        return (self.labels != EMPTY).sum(dim=1)

    def state_dict(self) -> dict[str, Any]:
        """Copies of the buffers and the pointer (a Python int), for checkpoints."""
        return {
            "vectors": self.vectors.clone(),
            "labels": self.labels.clone(),
            "ids": self.ids.clone(),
            "ptr": int(self.ptr),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; keys, shapes and the pointer range must match this queue exactly.

        Tensors are copied into the existing buffers, so the queue keeps its device and vector dtype.
        """
        expected = {"vectors", "labels", "ids", "ptr"}
        if set(state) != expected:
            raise ValueError(
                f"LabelQueue state must have keys {sorted(expected)}, got {sorted(state)} "
                f"(missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)})"
            )
        for key in ("vectors", "labels", "ids"):
            mine, theirs = getattr(self, key), state[key]
            if not isinstance(theirs, Tensor) or theirs.shape != mine.shape:
                got = tuple(theirs.shape) if isinstance(theirs, Tensor) else type(theirs).__name__
                raise ValueError(
                    f"LabelQueue state {key!r} must have shape {tuple(mine.shape)} "
                    f"(L={self.num_queues}, N_q={self.size}, D={self.dim}), got {got}"
                )
            if key != "vectors" and theirs.is_floating_point():
                raise ValueError(f"LabelQueue state {key!r} must be an integer tensor, got {theirs.dtype}")
        ptr = int(state["ptr"])
        if not 0 <= ptr < self.size:
            raise ValueError(f"LabelQueue state 'ptr' must be in [0, {self.size}), got {ptr}")
        for key in ("vectors", "labels", "ids"):
            getattr(self, key).copy_(state[key])
        self.ptr = ptr

    def __repr__(self) -> str:
        return (
            f"LabelQueue(num_queues={self.num_queues}, size={self.size}, dim={self.dim}, ptr={self.ptr}, "
            f"device={self.device}, dtype={self.vectors.dtype})"
        )
