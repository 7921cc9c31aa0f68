"""k-NN pseudo-labels over the label queues and sampling of semantic positives (SEMPPL-SPEC.md 6.2, 6.3, 8).

Both run without gradient. Empty queue slots (label -1) never count, and a slot holding the anchor's own
sample id is never its neighbour (6.1 "Timing": id masking keeps an image from voting for itself). Only the
given ``torch.Generator`` supplies randomness, and how much of it is consumed depends on shapes only, so every
process stays reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from paws_cli.modules.label_queue import EMPTY, LabelQueue


@dataclass(frozen=True)
class PseudoLabels:
    """k-NN result for B anchors.

    labels: (B,) long, the mode of the valid votes, -1 where no (view, queue) pair had a valid slot.
    votes: (B, L*L) long, v_{j,i} at column j * L + i (query view j, queue i), -1 where queue i had no valid
        slot for that anchor.
    agreement: (B,) float, share of the valid votes equal to ``labels`` (0 where there is none).
    has_vote: (B,) bool, at least one valid vote.
    """

    labels: Tensor
    votes: Tensor
    agreement: Tensor
    has_vote: Tensor


def _plurality(labels: Tensor, weights: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Label with the largest total weight over the last axis, ties to the smallest label; -1 if none valid.

    Vectorised without knowing the number of classes: every entry scores the weight of all valid entries that
    share its label (a K x K comparison, K being k or L*L, both small). Entries with the same label sum the
    same terms in the same order, so their scores are bit-identical and the tie test is exact.
    Returns (winner, winning score); the score is -inf where nothing is valid.
    """
    same = (labels[..., :, None] == labels[..., None, :]) & valid[..., None, :]
    score = (same.to(weights.dtype) * weights[..., None, :]).sum(dim=-1)
    score = score.masked_fill(~valid, float("-inf"))
    best = score.max(dim=-1).values
    contenders = valid & (score == best[..., None])
    winner = torch.where(contenders, labels, torch.iinfo(torch.long).max).min(dim=-1).values
    return torch.where(valid.any(dim=-1), winner, EMPTY), best


def _check_anchors(name: str, tensor: Tensor, batch: int | None) -> None:
    """Raise unless ``tensor`` is a 1-d integer tensor (of length ``batch`` when given)."""
    if tensor.dim() != 1 or tensor.is_floating_point() or (batch is not None and tensor.shape[0] != batch):
        expected = "B" if batch is None else str(batch)
        raise ValueError(
            f"{name} must be a ({expected},) integer tensor, got {tensor.dtype} {tuple(tensor.shape)}"
        )


@torch.no_grad()
def knn_pseudo_labels(
    queries: Tensor, queue: LabelQueue, anchor_ids: Tensor, k: int = 1, weighted: bool = False
) -> PseudoLabels:
    """Pseudo-label B anchors by a k-NN vote of each query view against each queue, then a mode (6.2).

    Args:
        queries: (L, B, D) query embeddings, one per large view (online predictions or target projections).
        queue: the L label queues.
        anchor_ids: (B,) global sample ids of the anchors; slots with the same id are masked.
        k: neighbours per (query view, queue) pair, among the valid slots (fewer if fewer are valid).
        weighted: weight each neighbour's vote by (1 + cos) / 2 (non-negative, monotone in the similarity)
            instead of 1.

    For each (j, i) the cosine similarities of queries[j] to queue i are computed, empty and same-id slots set
    to -inf, the top-k valid slots vote, and the plurality (ties to the smallest class) gives v_{j,i}. The
    label is the plurality of the valid v_{j,i} over the L*L pairs, again ties to the smallest class.
    """
    if queries.dim() != 3 or queries.shape[0] != queue.num_queues or queries.shape[2] != queue.dim:
        raise ValueError(
            f"queries must have shape (L={queue.num_queues}, B, D={queue.dim}), got {tuple(queries.shape)}"
        )
    num_views, batch, _ = queries.shape
    _check_anchors("anchor_ids", anchor_ids, batch)
    if not 1 <= k <= queue.size:
        raise ValueError(f"k must be in [1, N_q={queue.size}], got {k}")
    q = F.normalize(queries.detach().float(), dim=-1).to(queue.device)
    anchor_ids = anchor_ids.to(queue.device)
    per_queue = []
    # One queue at a time bounds the similarity tensor to (L, B, N_q).
    for i in range(queue.num_queues):
        sims = torch.einsum("jbd,nd->jbn", q, queue.vectors[i].float())
        blocked = (queue.labels[i] == EMPTY)[None, :] | (queue.ids[i][None, :] == anchor_ids[:, None])
        top, slot = sims.masked_fill(blocked, float("-inf")).topk(k, dim=-1)
        ok = torch.isfinite(top)
        weights = (1.0 + top) / 2.0 if weighted else torch.ones_like(top)
        vote, _ = _plurality(queue.labels[i][slot], torch.where(ok, weights, 0.0), ok)
        per_queue.append(vote)  # (L_j, B)
    votes = torch.stack(per_queue, dim=-1).permute(1, 0, 2).reshape(batch, num_views * queue.num_queues)
    valid = votes != EMPTY
    labels, best = _plurality(votes, torch.ones(votes.shape, device=votes.device), valid)
    has_vote = valid.any(dim=-1)
    agreement = torch.where(has_vote, best, 0.0) / valid.sum(dim=-1).clamp(min=1)
    return PseudoLabels(labels, votes, agreement, has_vote)


@torch.no_grad()
def sample_semantic_positives(
    queue: LabelQueue,
    labels: Tensor,
    anchor_ids: Tensor,
    num_positives: int,
    generator: torch.Generator,
    exclude_self: bool = True,
) -> tuple[Tensor, Tensor]:
    """Draw N_sp positives per anchor from every queue, uniformly among slots with the anchor's label (6.3).

    Args:
        queue: the L label queues.
        labels: (B,) label to match (true label, else pseudo-label); a negative label means none.
        anchor_ids: (B,) global sample ids, used to skip the anchor's own slots when ``exclude_self``.
        num_positives: N_sp, independent draws (with replacement) per anchor and queue.
        generator: the only source of randomness; the uniforms are drawn on its device, (L, N_sp, B) float64
            numbers per call whatever the queue holds.
        exclude_self: never pick a slot whose id equals the anchor's id.

    Returns:
        sem_pos (L, N_sp, B, D) in the queue's dtype (zero where invalid) and sem_valid (L, N_sp, B) bool, False
        where the anchor's label is negative or no matching slot exists in that queue.
    """
    _check_anchors("labels", labels, None)
    batch = labels.shape[0]
    _check_anchors("anchor_ids", anchor_ids, batch)
    if num_positives < 0:
        raise ValueError(f"num_positives must be >= 0, got {num_positives}")
    shape = (queue.num_queues, num_positives, batch)
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)
    uniform = uniform.to(queue.device)
    sem_pos = torch.zeros(*shape, queue.dim, dtype=queue.vectors.dtype, device=queue.device)
    sem_valid = torch.zeros(shape, dtype=torch.bool, device=queue.device)
    if num_positives == 0 or batch == 0:
        return sem_pos, sem_valid
    labels, anchor_ids = labels.to(queue.device), anchor_ids.to(queue.device)
    for j in range(queue.num_queues):
        match = (queue.labels[j][None, :] == labels[:, None]) & (labels[:, None] >= 0)
        if exclude_self:
            match &= queue.ids[j][None, :] != anchor_ids[:, None]
        # The r-th matching slot (r uniform in [0, count)) is the first position where the running count of
        # matches reaches r + 1: one batched searchsorted instead of a loop over anchors.
        running = match.cumsum(dim=1)
        count = running[:, -1]
        rank = (uniform[j] * count).floor().long().minimum((count - 1).clamp(min=0))  # (N_sp, B)
        slot = torch.searchsorted(running, (rank + 1).T.contiguous()).clamp(max=queue.size - 1)  # (B, N_sp)
        ok = (count > 0)[None, :].expand(num_positives, batch)
        sem_pos[j] = torch.where(ok[..., None], queue.vectors[j][slot.T], 0.0)
        sem_valid[j] = ok
    return sem_pos, sem_valid
