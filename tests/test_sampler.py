"""Tests for the class-stratified support sampler and the unlabelled batch order (spec section 2)."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from paws_cli.data.sampling.samplers import SupportSampler, UnlabelledOrder, _ClassQueue, _generator


def make_labels(counts: list[int], seed: int = 0, offset: int = 0) -> np.ndarray:
    """Shuffled labels with counts[c] images of class c + offset (indices of a class are not contiguous)."""
    labels = np.concatenate([np.full(n, c + offset, dtype=np.int64) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


def ranks(labels: np.ndarray, world_size: int, **kwargs) -> list[SupportSampler]:
    return [SupportSampler(labels, world_size=world_size, rank=r, **kwargs) for r in range(world_size)]


def epoch_batches(sampler: SupportSampler) -> list[torch.Tensor]:
    return [b.clone() for b in sampler]


@pytest.mark.parametrize("unique", [True, False])
def test_layout_p_rounds_of_k_distinct_classes(unique: bool) -> None:
    K, P = 4, 3
    labels = make_labels([7, 9, 8, 10, 11, 7, 13, 6, 12], offset=5)
    for sampler in ranks(labels, 2, classes_per_batch=K, images_per_class=P, batches_per_epoch=12,
                         unique_classes_per_rank=unique, seed=3):  # fmt: skip
        assert len(sampler) == 12
        batches = epoch_batches(sampler)
        assert len(batches) == 12
        for batch in batches:
            assert batch.dtype == torch.long and batch.shape == (K * P,)
            # batch_labels must agree with an independent lookup in the label array.
            got = sampler.batch_labels(batch)
            assert got.tolist() == labels[batch.numpy()].tolist()
            grid = got.view(P, K)  # row j = round j; column k = class k
            assert len(set(grid[0].tolist())) == K
            assert torch.equal(grid, grid[0].expand(P, K))


def test_unique_classes_disjoint_across_ranks_and_cover_k_times_w() -> None:
    K, W = 2, 3
    labels = make_labels([6] * 10)
    samplers = ranks(labels, W, classes_per_batch=K, images_per_class=2, batches_per_epoch=30, seed=1)
    per_rank = [epoch_batches(s) for s in samplers]
    for step in range(30):
        class_sets = [set(s.batch_labels(per_rank[r][step]).tolist()) for r, s in enumerate(samplers)]
        assert all(len(c) == K for c in class_sets)
        assert len(set().union(*class_sets)) == K * W  # pairwise disjoint, K*W distinct classes


def test_unique_classes_exactly_balanced_when_groups_tile_a_permutation() -> None:
    # 12 classes, K*W = 6: two steps use one full permutation, so the counts are exactly equal.
    K, W, steps = 3, 2, 40
    labels = make_labels([5] * 12)
    samplers = ranks(labels, W, classes_per_batch=K, images_per_class=2, batches_per_epoch=steps, seed=4)
    per_rank = [epoch_batches(s) for s in samplers]
    step_classes = [
        set().union(*(set(s.batch_labels(per_rank[r][i]).tolist()) for r, s in enumerate(samplers)))
        for i in range(steps)
    ]
    for i in range(0, steps, 2):
        assert step_classes[i] | step_classes[i + 1] == set(range(12))
    counts = Counter(c for cs in step_classes for c in cs)
    assert set(counts.values()) == {steps * K * W // 12}


def test_unique_classes_near_equal_frequency_with_dropped_leftovers() -> None:
    # 10 classes, K*W = 6: 4 classes are dropped from each permutation; each class is used with p = 0.6.
    K, W, steps = 3, 2, 600
    labels = make_labels([4] * 10)
    samplers = ranks(labels, W, classes_per_batch=K, images_per_class=1, batches_per_epoch=steps, seed=7)
    counts: Counter[int] = Counter()
    for s in samplers:
        for batch in s:
            counts.update(s.batch_labels(batch).tolist())
    expected = steps * 0.6  # Binomial(600, 0.6): sd = 12, the bound below is 3 sd
    assert set(counts) == set(range(10))
    assert all(abs(n - expected) <= 36 for n in counts.values()), counts


def test_shared_classes_use_disjoint_image_shards() -> None:
    K, P, W = 3, 2, 3
    class_counts = [9, 10, 11, 12, 13]
    labels = make_labels(class_counts)
    samplers = ranks(labels, W, classes_per_batch=K, images_per_class=P, batches_per_epoch=40,
                     unique_classes_per_rank=False, seed=2)  # fmt: skip
    per_rank = [epoch_batches(s) for s in samplers]
    used = [set() for _ in range(W)]
    for step in range(40):
        lab = [s.batch_labels(per_rank[r][step]) for r, s in enumerate(samplers)]
        assert all(torch.equal(lab[0], x) for x in lab)  # same classes, same order, on every rank
        for r in range(W):
            used[r].update(per_rank[r][step].tolist())
    for a in range(W):
        for b in range(a + 1, W):
            assert not used[a] & used[b]
    # 40 steps x 3 classes x 2 images per rank exhaust every shard: the shards partition each class.
    assert set().union(*used) == set(range(len(labels)))
    for r in range(W):
        for c, n in enumerate(class_counts):
            shard = [i for i in used[r] if labels[i] == c]
            assert len(shard) == len(range(r, n, W))


@pytest.mark.parametrize("unique", [True, False])
def test_no_repeat_within_class_until_queue_exhausted(unique: bool) -> None:
    # Class sizes not divisible by P, so queues run dry mid-batch.
    P, W = 3, 2
    class_counts = [7, 8, 10, 11]
    labels = make_labels(class_counts)
    for s in ranks(labels, W, classes_per_batch=2, images_per_class=P, batches_per_epoch=50,
                   unique_classes_per_rank=unique, seed=5):  # fmt: skip
        stream: dict[int, list[int]] = defaultdict(list)
        for batch in s:
            grid = batch.view(P, -1)
            for k, cls in enumerate(s.batch_labels(grid[0]).tolist()):
                stream[cls].extend(grid[:, k].tolist())
        replays = 0
        for cls, seq in stream.items():
            n = class_counts[cls] if unique else len(range(s.rank, class_counts[cls], W))
            candidates = set(seq[:n])
            assert len(candidates) == n
            if unique:
                assert candidates == set(np.flatnonzero(labels == cls).tolist())
            full = len(seq) // n
            assert full >= 2
            for j in range(full):
                assert set(seq[j * n : (j + 1) * n]) == candidates
            replays += seq[:n] == seq[n : 2 * n]
        # The second pass is a fresh shuffle, not a replay of the first. Images moved to the back at a
        # reshuffle make a chance match of one class likely enough (1/12 for n = 5, P = 3), so ask it of
        # the classes together.
        assert replays < len(stream)


def class_streams(sampler: SupportSampler, batches: list[torch.Tensor]) -> dict[int, list[list[int]]]:
    """Per class, the list of its P-image takes in batch order (column k of the P x K grid)."""
    takes: dict[int, list[list[int]]] = defaultdict(list)
    for batch in batches:
        grid = batch.view(sampler.images_per_class, -1)
        for k, cls in enumerate(sampler.batch_labels(grid[0]).tolist()):
            takes[cls].append(grid[:, k].tolist())
    return takes


# ImageNet 1%: 12-13 labelled images per class and P = 7, so most takes of a class cross a reshuffle.
IMAGENET_1PCT = [12, 13, 13, 12, 13, 12, 12, 13]


@pytest.mark.parametrize(("unique", "world_size", "counts"), [
    (True, 2, IMAGENET_1PCT),
    (False, 1, IMAGENET_1PCT),
    (False, 2, [16, 17, 18, 19, 17]),  # shards of 8-10 images per rank
])  # fmt: skip
def test_no_duplicate_image_within_a_batch_across_reshuffles(
    unique: bool, world_size: int, counts: list[int]
) -> None:
    P = 7
    labels = make_labels(counts)
    for s in ranks(labels, world_size, classes_per_batch=2, images_per_class=P, batches_per_epoch=150,
                   unique_classes_per_rank=unique, seed=13):  # fmt: skip
        batches = epoch_batches(s)
        for batch in batches:
            assert len(set(batch.tolist())) == batch.numel()
        crossings = 0
        for cls, takes in class_streams(s, batches).items():
            n = counts[cls] if unique else len(range(s.rank, counts[cls], world_size))
            # Only a take that starts mid-pass and runs past its end can collide: count those, to be sure
            # the test exercised them.
            crossings += sum((i * P) % n > n - P for i in range(len(takes)))
        assert crossings >= 50


@pytest.mark.parametrize("unique", [True, False])
def test_images_used_evenly_at_every_prefix_of_a_class_stream(unique: bool) -> None:
    # Invariant: at every point of a class's stream, use counts of its candidates differ by at most one,
    # i.e. every image is used k times before any is used k + 2 times (the stream is a chain of passes).
    P = 7
    labels = make_labels(IMAGENET_1PCT, seed=3)
    s = SupportSampler(labels, classes_per_batch=3, images_per_class=P, batches_per_epoch=120,
                       unique_classes_per_rank=unique, seed=21)  # fmt: skip
    for cls, takes in class_streams(s, epoch_batches(s)).items():
        candidates = np.flatnonzero(labels == cls).tolist()
        uses = dict.fromkeys(candidates, 0)
        for take in takes:
            for image in take:
                uses[image] += 1  # a KeyError here would mean an image of another class
                assert max(uses.values()) - min(uses.values()) <= 1, (cls, uses)
        assert min(uses.values()) >= 3  # long enough to span several reshuffles


def test_class_queue_matches_an_independent_reconstruction() -> None:
    # Rebuild the stream by hand from the documented rule: pass j is the candidates permuted with the seed
    # parts + (j,); on running dry mid-take, the images already taken go (in shuffled order) to the back.
    candidates = torch.tensor([40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52])
    parts = (3, 1, 0, 0, 5)
    n, P = len(candidates), 7
    queue = _ClassQueue(candidates, parts)
    got = [queue.take(P).tolist() for _ in range(30)]

    def shuffled(j: int) -> list[int]:
        return candidates[torch.randperm(n, generator=_generator(*parts, j))].tolist()

    expected, order, cursor, j = [], shuffled(0), 0, 0
    for _ in range(30):
        head = order[cursor : cursor + P]
        cursor += len(head)
        if len(head) < P:
            j += 1
            fresh = shuffled(j)
            order = [x for x in fresh if x not in head] + [x for x in fresh if x in head]
            cursor = P - len(head)
            head = head + order[:cursor]
        expected.append(head)
    assert got == expected
    assert j >= 10
    # skip() must leave the queue exactly where take() does, including across reshuffles.
    skipper = _ClassQueue(candidates, parts)
    for i in range(30):
        if i % 3 == 2:
            assert skipper.take(P).tolist() == expected[i]
        else:
            skipper.skip(P)
    with pytest.raises(ValueError, match=r"cannot take 14 distinct images.*only 13 candidates"):
        _ClassQueue(candidates, parts).take(14)


@pytest.mark.parametrize("unique", [True, False])
def test_resume_exact_across_reshuffle_boundaries(unique: bool) -> None:
    # 4 classes, K = 2: each class is drawn about every other batch, so queues reshuffle every few batches
    # and every saved position lies just before, after or between reshuffles of some class.
    P, steps = 7, 16
    counts = [12, 13, 13, 12]
    labels = make_labels(counts, seed=5)
    kw = dict(classes_per_batch=2, images_per_class=P, batches_per_epoch=steps,
              unique_classes_per_rank=unique, seed=17)  # fmt: skip
    reference = SupportSampler(labels, **kw)
    reference.set_epoch(1)
    full = epoch_batches(reference)
    after_reshuffle, used = 0, Counter()  # images drawn per class before each resume point
    for stop in range(steps):
        after_reshuffle += any(k > counts[c] for c, k in used.items())
        used.update(dict.fromkeys(reference.batch_labels(full[stop].view(P, -1)[0]).tolist(), P))
        run = SupportSampler(labels, **kw)
        run.set_epoch(1)
        it = iter(run)
        for _ in range(stop):
            next(it)
        resumed = SupportSampler(labels, **kw)
        resumed.load_state_dict(run.state_dict())
        rest = epoch_batches(resumed)
        assert len(rest) == steps - stop
        assert all(torch.equal(x, y) for x, y in zip(full[stop:], rest, strict=True)), stop
    assert after_reshuffle >= steps - 4


def test_determinism_and_independence_from_global_rng() -> None:
    labels = make_labels([6, 7, 8, 9, 10, 11])
    kw = dict(classes_per_batch=2, images_per_class=3, batches_per_epoch=10, world_size=2, rank=1)
    torch.manual_seed(0)
    a = epoch_batches(SupportSampler(labels, seed=11, **kw))
    torch.manual_seed(123)
    _ = torch.rand(10)
    b = epoch_batches(SupportSampler(labels, seed=11, **kw))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    other_seed = epoch_batches(SupportSampler(labels, seed=12, **kw))
    other_epoch = SupportSampler(labels, seed=11, **kw)
    other_epoch.set_epoch(1)
    for other in (other_seed, epoch_batches(other_epoch)):
        assert not all(torch.equal(x, y) for x, y in zip(a, other, strict=True))


@pytest.mark.parametrize("unique", [True, False])
@pytest.mark.parametrize("stop", [0, 1, 7, 12])
def test_state_round_trip_resumes_exactly(unique: bool, stop: int) -> None:
    labels = make_labels([9, 10, 11, 12, 13, 14])
    kw = dict(classes_per_batch=3, images_per_class=4, batches_per_epoch=13, world_size=2,
              unique_classes_per_rank=unique, seed=9)  # fmt: skip
    for rank in range(2):
        reference = SupportSampler(labels, rank=rank, **kw)
        reference.set_epoch(2)
        full = epoch_batches(reference)
        reference.set_epoch(3)
        next_epoch = epoch_batches(reference)

        run = SupportSampler(labels, rank=0, **kw)  # the saved state may come from another rank
        run.set_epoch(2)
        it = iter(run)
        for _ in range(stop):
            next(it)
        state = run.state_dict()
        assert state["position"] == stop and state["epoch"] == 2
        assert all(type(v) is int for v in state.values())

        resumed = SupportSampler(labels, rank=rank, **kw)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # a trainer re-entering the saved epoch keeps the position
        rest = epoch_batches(resumed)
        assert len(rest) == 13 - stop
        assert all(torch.equal(x, y) for x, y in zip(full[stop:], rest, strict=True))
        # After a finished epoch, iterating again rolls over to the next epoch.
        assert all(torch.equal(x, y) for x, y in zip(next_epoch, epoch_batches(resumed), strict=True))
        assert resumed.state_dict()["epoch"] == 3


def test_set_epoch_resets_position_only_for_a_new_epoch() -> None:
    s = SupportSampler(make_labels([4] * 5), classes_per_batch=2, images_per_class=2, batches_per_epoch=6)
    it = iter(s)
    next(it), next(it)
    s.set_epoch(0)
    assert s.position == 2
    s.set_epoch(1)
    assert (s.epoch, s.position) == (1, 0)


def test_errors_are_clear() -> None:
    labels = make_labels([5] * 6)
    kw = dict(images_per_class=2, batches_per_epoch=4)
    with pytest.raises(ValueError, match=r"2 x 4 = 8 distinct classes.*only 6 classes"):
        SupportSampler(labels, classes_per_batch=2, world_size=4, **kw)
    with pytest.raises(ValueError, match=r"classes_per_batch=7 exceeds the 6 classes"):
        SupportSampler(labels, classes_per_batch=7, unique_classes_per_rank=False, **kw)
    small = make_labels([9, 9, 5, 9], offset=10)  # class 12 has 5 images: 2 per process with W = 2
    with pytest.raises(ValueError, match=r"class 12 has 5 labelled images.*2 per process with world_size=2"
                                         r".*images_per_class=3.*use more labels"):  # fmt: skip
        SupportSampler(small, classes_per_batch=2, images_per_class=3, batches_per_epoch=4, world_size=2,
                       unique_classes_per_rank=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"class 12 has 5 labelled images.*images_per_class=6"):
        SupportSampler(small, classes_per_batch=2, images_per_class=6, batches_per_epoch=4)
    with pytest.raises(ValueError, match="labelled subset is empty"):
        SupportSampler([], classes_per_batch=1, **kw)
    with pytest.raises(ValueError, match="non-negative class ids, found -1"):
        SupportSampler([0, 1, -1, 1], classes_per_batch=1, images_per_class=1, batches_per_epoch=1)
    with pytest.raises(ValueError, match="integer class ids"):
        SupportSampler([0.0, 1.0], classes_per_batch=1, images_per_class=1, batches_per_epoch=1)
    bad_settings = [
        dict(classes_per_batch=0),
        dict(classes_per_batch=2, seed=-1),
        dict(classes_per_batch=2, batches_per_epoch=-3),
        dict(classes_per_batch=2, rank=1),
    ]
    for bad in bad_settings:
        with pytest.raises(ValueError, match="must be"):
            SupportSampler(labels, **{**kw, **bad})


def test_load_state_with_other_settings_names_the_field() -> None:
    labels = make_labels([6] * 6)
    kw = dict(classes_per_batch=2, images_per_class=2, batches_per_epoch=5, world_size=2, seed=1)
    state = SupportSampler(labels, **kw).state_dict()
    for field, change in [("classes_per_batch", 3), ("images_per_class", 3), ("seed", 2)]:
        with pytest.raises(ValueError, match=rf"{field}="):
            SupportSampler(labels, **{**kw, field: change}).load_state_dict(state)
    with pytest.raises(ValueError, match=r"world_size=2 but this run has world_size=1.*not supported yet"):
        SupportSampler(labels, **{**kw, "world_size": 1}).load_state_dict(state)
    with pytest.raises(ValueError, match="labels_crc32"):
        SupportSampler(make_labels([6] * 6, seed=1), **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="missing the field 'position'"):
        SupportSampler(labels, **kw).load_state_dict({k: v for k, v in state.items() if k != "position"})
    with pytest.raises(ValueError, match="position=6"):
        SupportSampler(labels, **kw).load_state_dict({**state, "position": 6})


def test_describe() -> None:
    labels = make_labels([8] * 10)
    one = SupportSampler(labels, classes_per_batch=10, images_per_class=8, batches_per_epoch=1)
    assert one.describe() == (
        "support: 10 classes x 8 images per process, 1 process -> 80 global supports "
        "(10 distinct classes) per step"
    )
    two = SupportSampler(labels, classes_per_batch=5, images_per_class=4, batches_per_epoch=1, world_size=2)
    assert two.describe().endswith("2 processes -> 40 global supports (10 distinct classes) per step")
    shared = SupportSampler(
        labels, classes_per_batch=5, images_per_class=4, batches_per_epoch=1, world_size=2,
        unique_classes_per_rank=False,
    )  # fmt: skip
    assert "(5 distinct classes)" in shared.describe()


# ---------------------------------------------------------------- unlabelled order


def test_unlabelled_ranks_tile_the_permutation() -> None:
    N, B, W = 103, 4, 3
    orders = [UnlabelledOrder(N, B, world_size=W, rank=r, seed=6) for r in range(W)]
    steps = orders[0].steps_per_epoch
    assert steps == N // (B * W) == len(orders[0])
    perm = orders[0].epoch_permutation()
    assert sorted(perm.tolist()) == list(range(N))
    per_rank = [list(o) for o in orders]
    assert all(len(b) == steps and all(len(x) == B for x in b) for b in per_rank)
    concat = torch.cat([per_rank[r][s] for s in range(steps) for r in range(W)])
    assert torch.equal(concat, perm[: steps * B * W])  # disjoint, contiguous slices in rank order


def test_unlabelled_keep_last_pads_from_the_start() -> None:
    N, B, W = 10, 2, 2
    orders = [UnlabelledOrder(N, B, world_size=W, rank=r, seed=1, drop_last=False) for r in range(W)]
    assert orders[0].steps_per_epoch == 3
    perm = orders[0].epoch_permutation()
    concat = torch.cat([b for s in zip(*(list(o) for o in orders), strict=True) for b in s])
    assert torch.equal(concat, torch.cat([perm, perm[:2]]))


def test_unlabelled_determinism_and_uniformity() -> None:
    a, b = UnlabelledOrder(50, 5, seed=3), UnlabelledOrder(50, 5, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.epoch_permutation(0), a.epoch_permutation(1))
    assert not torch.equal(a.epoch_permutation(0), UnlabelledOrder(50, 5, seed=4).epoch_permutation(0))
    # Consecutive epoch seeds must give independent permutations: the first image is uniform over 5.
    order = UnlabelledOrder(5, 1, seed=0)
    first = Counter(int(order.epoch_permutation(e)[0]) for e in range(2000))
    chi2 = sum((n - 400) ** 2 / 400 for n in first.values())
    assert len(first) == 5 and chi2 < 18.5  # chi-square, 4 dof: p = 0.001


def test_unlabelled_state_resume_and_errors() -> None:
    full_run = UnlabelledOrder(60, 4, world_size=2, rank=1, seed=8)
    full_run.set_epoch(4)
    full = list(full_run)
    run = UnlabelledOrder(60, 4, world_size=2, rank=1, seed=8)
    run.set_epoch(4)
    it = iter(run)
    for _ in range(3):
        next(it)
    state = run.state_dict()
    assert (state["epoch"], state["position"]) == (4, 3)
    resumed = UnlabelledOrder(60, 4, world_size=2, rank=1, seed=8)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert all(torch.equal(x, y) for x, y in zip(full[3:], rest, strict=True)) and len(rest) == len(full) - 3
    with pytest.raises(ValueError, match="batch_size=4 but this run has batch_size=5"):
        UnlabelledOrder(60, 5, world_size=2, rank=1, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="not supported yet"):
        UnlabelledOrder(60, 4, world_size=1, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match=r"7 images, fewer than one global batch.*4 x 2 = 8"):
        UnlabelledOrder(7, 4, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        UnlabelledOrder(7, 0)
