"""SemPPL building blocks (SEMPPL-SPEC.md 5.3, 6, 12): EMA helpers, label queues, k-NN votes, positives."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from paws_cli.modules import (
    LabelQueue,
    cosine_momentum,
    knn_pseudo_labels,
    make_target,
    sample_semantic_positives,
    update_momentum,
)

# ---------------------------------------------------------------- EMA (5.3)


def test_cosine_momentum_endpoints_and_midpoint() -> None:
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99, abs=1e-15)
    assert cosine_momentum(100, 100, 0.99) == 1.0
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)  # cos(pi/2) = 0: halfway to 1
    values = [cosine_momentum(t, 100, 0.996) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    for bad in [(0, 0, 0.99), (-1, 10, 0.99), (11, 10, 0.99), (0, 10, 1.5)]:
        with pytest.raises(ValueError):
            cosine_momentum(*bad)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


def test_update_momentum_hand_case_and_buffers() -> None:
    online = _net()
    target = make_target(online)
    assert all(not p.requires_grad for p in target.parameters()) and all(
        p.requires_grad for p in online.parameters()
    )
    assert target[0].weight.data_ptr() != online[0].weight.data_ptr()  # a real copy
    with torch.no_grad():
        target[0].weight.fill_(1.0)
        online[0].weight.copy_(torch.tensor([[3.0, -1.0], [0.0, 2.0]]))
        online[1].running_mean.copy_(torch.tensor([5.0, 6.0]))
    online[1].num_batches_tracked += 7
    update_momentum(target, online, 0.9)
    # 0.9 * 1 + 0.1 * theta: 1.2, 0.8, 0.9, 1.1.
    torch.testing.assert_close(target[0].weight, torch.tensor([[1.2, 0.8], [0.9, 1.1]]))
    torch.testing.assert_close(target[1].running_mean, torch.tensor([5.0, 6.0]))  # buffers copied
    assert target[1].num_batches_tracked.item() == 7


def test_update_momentum_extremes_and_mismatch() -> None:
    online, other = _net(), _net()
    target = make_target(other)
    before = [p.clone() for p in target.parameters()]
    update_momentum(target, online, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))
    update_momentum(target, online, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters()))
    with pytest.raises(ValueError, match="only in online"):
        update_momentum(make_target(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)), 0.5)
    with pytest.raises(ValueError, match="momentum m"):
        update_momentum(target, online, 1.5)


# ---------------------------------------------------------------- queue (6.1)


def _item_vectors(n: int, start: int, num_queues: int = 2) -> torch.Tensor:
    """Item k of queue j is the unit vector along [1, k, j] (distinct for every item and queue)."""
    k = torch.arange(start, start + n, dtype=torch.float32)
    raw = torch.stack(
        [torch.stack([torch.ones(n), k, torch.full((n,), float(j))], 1) for j in range(num_queues)]
    )
    return raw  # not unit: enqueue normalises them


def test_queue_starts_empty_and_wraps_around() -> None:
    queue = LabelQueue(2, 5, 3)
    assert (queue.labels == -1).all() and (queue.ids == -1).all() and queue.vectors.abs().sum() == 0
    assert queue.classes_present().numel() == 0 and queue.ptr == 0
    start = 0
    for n in (3, 3, 2):  # items 0..7: 0,1,2 -> slots 0,1,2; 3,4 -> 3,4; 5,6,7 -> 0,1,2 (wrapped)
        queue.enqueue(
            _item_vectors(n, start), torch.arange(start, start + n) + 100, torch.arange(start, start + n)
        )
        start += n
    items = torch.tensor([5, 6, 7, 3, 4])
    assert queue.ptr == 3
    assert torch.equal(queue.labels, (items + 100).expand(2, 5)) and torch.equal(
        queue.ids, items.expand(2, 5)
    )
    expected = torch.nn.functional.normalize(_item_vectors(8, 0)[:, items], dim=-1)
    torch.testing.assert_close(queue.vectors, expected)
    torch.testing.assert_close(queue.vectors.norm(dim=-1), torch.ones(2, 5))
    # More items than slots, from ptr 3: only the last five of items 10..16 survive, at (3 + 2 + r) % 5.
    queue.enqueue(_item_vectors(7, 10), torch.arange(10, 17), torch.arange(10, 17))
    assert queue.ptr == (3 + 7) % 5 and torch.equal(queue.ids[0], torch.tensor([12, 13, 14, 15, 16]))
    assert torch.equal(queue.classes_present(), torch.arange(12, 17)) and queue.num_filled().tolist() == [
        5,
        5,
    ]
    queue.enqueue(torch.zeros(2, 0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert queue.ptr == 0


def test_queue_state_dict_round_trip() -> None:
    queue = LabelQueue(2, 5, 3)
    queue.enqueue(_item_vectors(4, 0), torch.arange(4), torch.arange(4) + 50)
    state = queue.state_dict()
    restored = LabelQueue(2, 5, 3)
    restored.load_state_dict(state)
    queue.enqueue(_item_vectors(3, 4), torch.arange(3), torch.arange(3))
    restored.enqueue(_item_vectors(3, 4), torch.arange(3), torch.arange(3))
    for key in ("vectors", "labels", "ids"):
        assert torch.equal(getattr(queue, key), getattr(restored, key))
    assert restored.ptr == queue.ptr == 2
    assert torch.equal(state["ids"][0, :4], torch.arange(4) + 50)  # the saved state is a copy
    assert queue.to("meta").device.type == "meta" and queue.labels.device.type == "meta"


def test_queue_errors_name_the_problem() -> None:
    queue = LabelQueue(2, 5, 3)
    with pytest.raises(ValueError, match=r"vectors must have shape \(L=2, n, D=3\)"):
        queue.enqueue(
            torch.zeros(3, 2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="labels and ids"):
        queue.enqueue(
            torch.zeros(2, 2, 3), torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long)
        )
    good = queue.state_dict()
    with pytest.raises(ValueError, match=r"'vectors' must have shape \(2, 5, 3\)"):
        queue.load_state_dict(good | {"vectors": torch.zeros(2, 6, 3)})
    with pytest.raises(ValueError, match="missing"):
        queue.load_state_dict({k: v for k, v in good.items() if k != "ptr"})
    with pytest.raises(ValueError, match="ptr"):
        queue.load_state_dict(good | {"ptr": 5})
    with pytest.raises(ValueError, match="integer"):
        queue.load_state_dict(good | {"labels": good["labels"].float()})
    with pytest.raises(ValueError, match="size"):
        LabelQueue(2, 0, 3)


# ---------------------------------------------------------------- k-NN pseudo-labels (6.2)


def _random_queue(num_queues: int, size: int, dim: int, classes: int, seed: int) -> LabelQueue:
    g = torch.Generator().manual_seed(seed)
    queue = LabelQueue(num_queues, size, dim)
    queue.vectors = torch.nn.functional.normalize(torch.randn(num_queues, size, dim, generator=g), dim=-1)
    queue.labels = torch.randint(-1, classes, (num_queues, size), generator=g)  # about 1 in classes+1 empty
    queue.ids = torch.randint(0, 12, (num_queues, size), generator=g)
    return queue


def _plurality_ref(scores: dict[int, float]) -> int:
    best = max(scores.values())
    return min(label for label, score in scores.items() if score == best)


def _knn_reference(queries, queue, anchor_ids, k, weighted):
    """Brute force over anchors, query views, queues and slots, in Python floats."""
    L, B, _ = queries.shape
    q = torch.nn.functional.normalize(queries, dim=-1).double()
    labels, votes, agreement = [], [], []
    for b in range(B):
        row = []
        for j in range(L):
            for i in range(L):
                cands = [
                    (float(q[j, b] @ queue.vectors[i, r].double()), int(queue.labels[i, r]))
                    for r in range(queue.size)
                    if queue.labels[i, r] != -1 and queue.ids[i, r] != anchor_ids[b]
                ]
                scores: dict[int, float] = {}
                for sim, label in sorted(cands, reverse=True)[:k]:
                    scores[label] = scores.get(label, 0.0) + ((1 + sim) / 2 if weighted else 1.0)
                row.append(_plurality_ref(scores) if scores else -1)
        counts: dict[int, float] = {}
        for v in row:
            if v != -1:
                counts[v] = counts.get(v, 0) + 1
        labels.append(_plurality_ref(counts) if counts else -1)
        agreement.append(counts[labels[-1]] / sum(counts.values()) if counts else 0.0)
        votes.append(row)
    return torch.tensor(labels), torch.tensor(votes), torch.tensor(agreement)


@pytest.mark.parametrize("k,weighted", [(1, False), (3, False), (3, True), (5, True)])
def test_knn_matches_brute_force(k: int, weighted: bool) -> None:
    queue = _random_queue(3, 16, 4, classes=4, seed=k + 10 * weighted)
    queue.labels[2, :] = -1  # a whole queue empty: its votes are -1 and ignored by the mode
    queue.labels[1, 2:] = -1  # two valid slots only: fewer than k neighbours
    g = torch.Generator().manual_seed(1)
    queries, anchor_ids = torch.randn(3, 8, 4, generator=g), torch.randint(0, 12, (8,), generator=g)
    got = knn_pseudo_labels(queries, queue, anchor_ids, k=k, weighted=weighted)
    labels, votes, agreement = _knn_reference(queries, queue, anchor_ids, k, weighted)
    assert torch.equal(got.votes, votes) and torch.equal(got.labels, labels)
    torch.testing.assert_close(got.agreement, agreement.float())
    assert torch.equal(got.has_vote, labels >= 0)
    assert (votes == -1).any() and (votes >= 0).all(dim=1).logical_not().any()  # the masks were exercised


def test_knn_masks_own_id_and_empty_slots() -> None:
    queue = LabelQueue(1, 4, 2)
    queue.vectors = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [1.0, 0.0]]])
    queue.labels = torch.tensor([[7, 2, 5, -1]])  # slot 3 is empty although it matches the query exactly
    queue.ids = torch.tensor([[42, 1, 2, -1]])
    query = torch.tensor([[[1.0, 0.0]]])
    assert knn_pseudo_labels(query, queue, torch.tensor([42])).labels.tolist() == [2]  # own slot 0 skipped
    assert knn_pseudo_labels(query, queue, torch.tensor([9])).labels.tolist() == [7]
    empty = knn_pseudo_labels(query, LabelQueue(1, 4, 2), torch.tensor([9]), k=2)
    assert empty.labels.tolist() == [-1] and not empty.has_vote.item() and empty.agreement.item() == 0.0
    with pytest.raises(ValueError, match="queries"):
        knn_pseudo_labels(torch.zeros(2, 1, 2), queue, torch.tensor([9]))
    with pytest.raises(ValueError, match="k must be"):
        knn_pseudo_labels(query, queue, torch.tensor([9]), k=5)
    with pytest.raises(ValueError, match="anchor_ids"):
        knn_pseudo_labels(query, queue, torch.tensor([9, 8]))


# ---------------------------------------------------------------- semantic positives (6.3)


def _slot_of(vector: torch.Tensor, bank: torch.Tensor) -> int:
    hits = (bank == vector).all(dim=-1).nonzero().flatten()
    assert hits.numel() == 1
    return int(hits[0])


def test_positives_carry_the_label_and_skip_self() -> None:
    queue = _random_queue(3, 30, 4, classes=3, seed=5)
    labels = torch.tensor([0, 1, 2, -1, 7, 0, 1, 2])
    ids = torch.randint(0, 12, (8,), generator=torch.Generator().manual_seed(2))
    sem_pos, valid = sample_semantic_positives(queue, labels, ids, 4, torch.Generator().manual_seed(0))
    assert sem_pos.shape == (3, 4, 8, 4) and valid.shape == (3, 4, 8)
    assert not valid[:, :, 3:5].any() and (sem_pos[~valid] == 0).all()  # label -1 and an absent class
    for j, s, b in valid.nonzero().tolist():
        r = _slot_of(sem_pos[j, s, b], queue.vectors[j])
        assert queue.labels[j, r] == labels[b] and queue.ids[j, r] != ids[b]
    # Valid exactly where some slot other than the anchor's own carries its label.
    possible = (
        (queue.labels[:, None] == labels[:, None])
        & (queue.ids[:, None] != ids[:, None])
        & (labels >= 0)[:, None]
    )
    assert torch.equal(valid, possible.any(-1)[:, None].expand(3, 4, 8))


def test_exclude_self_and_missing_classes() -> None:
    queue = LabelQueue(2, 4, 2)
    queue.enqueue(torch.randn(2, 3, 2), torch.tensor([4, 4, 6]), torch.tensor([10, 11, 12]))
    labels, ids = torch.tensor([6, 6, 5]), torch.tensor([12, 99, 13])
    _, valid = sample_semantic_positives(queue, labels, ids, 2, torch.Generator().manual_seed(0))
    assert valid[:, :, 0].logical_not().all()  # its only slot is itself
    assert valid[:, :, 1].all() and not valid[:, :, 2].any()  # class 5 is absent
    sem_pos, valid = sample_semantic_positives(queue, labels, ids, 2, torch.Generator(), exclude_self=False)
    assert valid[:, :, 0].all() and torch.equal(sem_pos[0, 0, 0], queue.vectors[0, 2])


def test_positives_are_uniform_over_matching_slots() -> None:
    queue = LabelQueue(1, 12, 3)
    labels = torch.tensor([3, 1, 3, 3, -1, 3, 1, 3, 0, 3, 1, 1])  # class 3 at slots 0, 2, 3, 5, 7, 9
    queue.enqueue(torch.randn(1, 12, 3), labels, torch.arange(12))
    anchors = 400
    sem_pos, valid = sample_semantic_positives(
        queue, torch.full((anchors,), 3), torch.full((anchors,), 7), 30, torch.Generator().manual_seed(0)
    )
    assert valid.all()
    hits = (sem_pos.reshape(-1, 1, 3) == queue.vectors[0][None]).all(dim=-1)
    assert (hits.sum(dim=1) == 1).all()  # every draw is exactly one queue slot
    slots = hits.int().argmax(dim=1)
    counts = torch.bincount(slots, minlength=12)
    matching = [2, 3, 5, 9, 0]  # id 7 is the anchor's own slot: excluded
    assert counts[7] == 0 and counts.sum() == counts[matching].sum()
    expected = counts.sum().item() / len(matching)
    chi2 = sum((counts[r].item() - expected) ** 2 / expected for r in matching)
    try:
        from scipy.stats import chi2 as chi2_dist

        critical = chi2_dist.ppf(0.999, df=len(matching) - 1)
    except ImportError:  # the 0.999 quantile of chi-square with 4 degrees of freedom, from the tables
        critical = 18.467
    assert chi2 < critical, f"chi2={chi2:.2f} >= {critical:.2f}: counts {counts[matching].tolist()}"


def test_oracle_labels_give_full_validity_and_draws_are_reproducible() -> None:
    queue = LabelQueue(4, 64, 8)
    g = torch.Generator().manual_seed(3)
    queue.enqueue(torch.randn(4, 64, 8, generator=g), torch.arange(64) % 10, torch.arange(64))
    labels, ids = torch.randint(0, 10, (32,), generator=g), torch.arange(100, 132)
    first = sample_semantic_positives(queue, labels, ids, 3, torch.Generator().manual_seed(7))
    again = sample_semantic_positives(queue, labels, ids, 3, torch.Generator().manual_seed(7))
    assert first[1].all()  # every anchor's (true) class is in every queue
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = sample_semantic_positives(queue, labels, ids, 3, torch.Generator().manual_seed(8))
    assert not torch.equal(first[0], other[0])
    # The randomness consumed depends on shapes only, not on what the queue holds.
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    sample_semantic_positives(queue, labels, ids, 3, g1)
    sample_semantic_positives(LabelQueue(4, 64, 8), labels, ids, 3, g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert not sample_semantic_positives(queue, labels, ids, 0, g1)[1].numel()
    with pytest.raises(ValueError, match="anchor_ids"):
        sample_semantic_positives(queue, labels, ids[:3], 3, g1)
    with pytest.raises(ValueError, match="labels"):
        sample_semantic_positives(queue, labels[None], ids, 3, g1)
    assert math.isfinite(float(first[0].sum()))
