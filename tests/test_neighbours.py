"""Tests for paws_cli.eval.neighbours: PAWS-NN, weighted k-NN, top-k accuracy and batched embedding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from paws_cli.eval.neighbours import (
    DEFAULT_BLOCK_BYTES,
    _check_finite,
    auto_chunk_size,
    embed_batches,
    knn_predict,
    soft_nn_predict,
    topk_accuracy,
)


def _random_problem(seed: int, q: int = 23, s: int = 50, d: int = 16, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(q, d, generator=g)
    bank = torch.randn(s, d, generator=g)
    labels = torch.randint(0, c, (s,), generator=g)
    return queries, bank, labels, c


def _soft_nn_float64(queries, bank, labels, c, tau, normalize=True):
    """Independent reference in numpy float64 with the full similarity matrix and a dense one-hot."""
    q = queries.double().numpy()
    b = bank.double().numpy()
    if normalize:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = q @ b.T / tau
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(c)[labels.numpy()]
    return p @ onehot


def _knn_float64(queries, bank, labels, c, k, temperature):
    """Brute-force weighted k-NN in float64: sort every similarity row, keep k, add up weights."""
    q = queries.double().numpy()
    b = bank.double().numpy()
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sims = q @ b.T
    out = np.zeros((q.shape[0], c))
    for i in range(q.shape[0]):
        for j in np.argsort(-sims[i])[:k]:
            out[i, labels[j]] += math.exp(sims[i, j] / temperature)
    return out


# ----------------------------------------------------------------------------------- soft_nn_predict


@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_soft_nn_matches_float64_reference(chunk_size, tau):
    queries, bank, labels, c = _random_problem(0)
    got = soft_nn_predict(queries, bank, labels, c, tau=tau, chunk_size=chunk_size)
    want = _soft_nn_float64(queries, bank, labels, c, tau)
    assert got.dtype == torch.float32 and got.shape == (23, c)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5, rtol=0)


def test_soft_nn_without_normalisation_matches_reference():
    queries, bank, labels, c = _random_problem(1)
    got = soft_nn_predict(queries * 0.3, bank * 0.3, labels, c, tau=1.0, normalize=False, chunk_size=5)
    want = _soft_nn_float64(queries * 0.3, bank * 0.3, labels, c, tau=1.0, normalize=False)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5, rtol=0)


def test_soft_nn_rows_sum_to_one_and_are_nonnegative():
    queries, bank, labels, c = _random_problem(2, q=40, s=200, c=11)
    probs = soft_nn_predict(queries, bank, labels, c, chunk_size=9)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(40), atol=1e-6, rtol=0)


def test_soft_nn_is_scale_invariant_when_normalising():
    queries, bank, labels, c = _random_problem(3)
    scale_q = torch.rand(queries.shape[0], 1, generator=torch.Generator().manual_seed(9)) * 10 + 0.1
    a = soft_nn_predict(queries, bank, labels, c)
    b = soft_nn_predict(queries * scale_q, bank * 7.5, labels, c)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_soft_nn_with_tiny_tau_is_one_nearest_neighbour():
    queries, bank, labels, c = _random_problem(4, q=30, s=60, c=7)
    qn = torch.nn.functional.normalize(queries.double(), dim=1)
    bn = torch.nn.functional.normalize(bank.double(), dim=1)
    sims = qn @ bn.T
    top2 = sims.topk(2, dim=1).values
    # The random draw must separate best and runner-up, or "the" nearest neighbour is ill-defined.
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    nearest_label = labels[sims.argmax(dim=1)]
    probs = soft_nn_predict(queries, bank, labels, c, tau=1e-5, chunk_size=4)
    expected = torch.nn.functional.one_hot(nearest_label, c).float()
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)


def test_soft_nn_collapsed_bank_predicts_class_frequencies():
    # Proposition 1 setting: every bank embedding is the same vector, so all similarities tie and
    # the prediction is the label histogram of the bank, whatever the query.
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    bank = torch.tensor([[0.3, -1.2, 2.0]]).repeat(6, 1)
    queries = torch.randn(5, 3, generator=torch.Generator().manual_seed(5))
    probs = soft_nn_predict(queries, bank, labels, 4, chunk_size=2)
    expected = torch.tensor([3 / 6, 1 / 6, 2 / 6, 0.0]).expand(5, 4)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)


def test_soft_nn_half_inputs_are_computed_in_float32():
    queries, bank, labels, c = _random_problem(6)
    qh, bh = queries.half(), bank.half()
    got = soft_nn_predict(qh, bh, labels.int(), c, chunk_size=8)
    assert got.dtype == torch.float32
    # Reference on the half values themselves: only float32 rounding separates the two.
    want = _soft_nn_float64(qh.float(), bh.float(), labels, c, 0.1)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5, rtol=0)


def test_soft_nn_empty_queries_give_empty_output():
    _, bank, labels, c = _random_problem(7)
    out = soft_nn_predict(torch.empty(0, 16), bank, labels, c)
    assert out.shape == (0, c)


def test_auto_chunk_size_respects_the_block_budget():
    assert auto_chunk_size(131072) == 512  # 512 x 131072 x 4 bytes = 256 MiB exactly
    for s in (1, 3, 1000, 131072, 10**9):
        chunk = auto_chunk_size(s)
        assert chunk >= 1
        assert chunk == 1 or chunk * s * 4 <= DEFAULT_BLOCK_BYTES
        assert (chunk + 1) * s * 4 > DEFAULT_BLOCK_BYTES  # the largest chunk that fits
    with pytest.raises(ValueError, match="bank_size"):
        auto_chunk_size(0)


# -------------------------------------------------------------------------------------- validation


def _good():
    return _random_problem(8, q=4, s=6, d=3, c=3)


@pytest.mark.parametrize("predict", [soft_nn_predict, knn_predict])
@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda q, b, y, c: (q[0], b, y, c), "queries must be 2-D"),
        (lambda q, b, y, c: (q, b[:, :2], y, c), "dimension mismatch"),
        (lambda q, b, y, c: (q, b[:0], y[:0], c), "bank is empty"),
        (lambda q, b, y, c: (q, b, y[:-1], c), "one label per bank row"),
        (lambda q, b, y, c: (q, b, y.float(), c), "integer tensor"),
        (lambda q, b, y, c: (q, b, torch.tensor([0, 1, 2, 3, 0, 1]), c), r"\[0, num_classes=3\)"),
        (lambda q, b, y, c: (q, b, torch.tensor([0, -1, 2, 0, 0, 1]), c), r"\[-1, 2\]"),
        (lambda q, b, y, c: (q, b, y, 0), "num_classes must be a positive int"),
        (lambda q, b, y, c: (q.int(), b, y, c), "floating point"),
    ],
)
def test_bad_inputs_raise_clear_errors(predict, mutate, match):
    args = mutate(*_good())
    kwargs = {"k": 1} if predict is knn_predict else {}
    with pytest.raises(ValueError, match=match):
        predict(*args, **kwargs)


@pytest.mark.parametrize("predict", [soft_nn_predict, knn_predict])
def test_non_finite_embeddings_are_rejected_with_row(predict):
    q, b, y, c = _good()
    bad_bank = b.clone()
    bad_bank[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"bank contains non-finite values \(first at row 4\)"):
        predict(q, bad_bank, y, c)
    bad_q = q.clone()
    bad_q[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"queries contains non-finite values \(first at row 2\)"):
        predict(bad_q, b, y, c)


def test_finite_check_reports_first_bad_row_and_ignores_overflowing_sums():
    x = torch.zeros(6, 3, dtype=torch.float16)
    x[3, 2] = float("nan")
    x[5, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"emb contains non-finite values \(first at row 3\)"):
        _check_finite(x, "emb")
    # Finite values whose row sum overflows float32 must not be reported as non-finite.
    big = torch.tensor([[3e38, 3e38, 0.0], [1.0, 2.0, 3.0]])
    _check_finite(big, "emb")


def test_bad_tau_and_chunk_size_raise():
    q, b, y, c = _good()
    with pytest.raises(ValueError, match="tau"):
        soft_nn_predict(q, b, y, c, tau=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        soft_nn_predict(q, b, y, c, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(q, b, y, c, k=2, temperature=-1.0)


# --------------------------------------------------------------------------------------- knn_predict


def test_knn_hand_computed_case():
    # Bank in 2-D (unit vectors except where noted) and labels:
    #   b0 = (1, 0) -> 0,  b1 = (0, 1) -> 1,  b2 = (-1, 0) -> 1,  b3 = (0.6, 0.8) -> 2
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1, 2])
    queries = torch.tensor(
        [
            [1.0, 0.0],  # cos = [1, 0, -1, 0.6]    -> top-2: b0 (1.0, cls 0), b3 (0.6, cls 2)
            [0.0, 2.0],  # cos = [0, 1, 0, 0.8]     -> top-2: b1 (1.0, cls 1), b3 (0.8, cls 2)
            [-0.6, 0.8],  # cos = [-.6, .8, .6, .28] -> top-2: b1 (0.8, cls 1), b2 (0.6, cls 1)
        ]
    )
    t = 0.5
    expected = torch.tensor(
        [
            [math.exp(1.0 / t), 0.0, math.exp(0.6 / t)],
            [0.0, math.exp(1.0 / t), math.exp(0.8 / t)],
            [0.0, math.exp(0.8 / t) + math.exp(0.6 / t), 0.0],
        ]
    )
    got = knn_predict(queries, bank, labels, 3, k=2, temperature=t, chunk_size=2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    # k = S uses every bank point: class 1 of query 0 collects exp(0/t) + exp(-1/t).
    full = knn_predict(queries, bank, labels, 3, k=4, temperature=t)
    assert full[0, 1].item() == pytest.approx(1.0 + math.exp(-1.0 / t), rel=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_knn_matches_float64_brute_force(chunk_size):
    queries, bank, labels, c = _random_problem(10, q=20, s=80, c=6)
    got = knn_predict(queries, bank, labels, c, k=9, temperature=0.07, chunk_size=chunk_size)
    want = _knn_float64(queries, bank, labels, c, k=9, temperature=0.07)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-5, atol=0)


def test_knn_k_larger_than_bank_raises():
    q, b, y, c = _good()
    with pytest.raises(ValueError, match=r"k=7 is larger than the bank \(6 rows\)"):
        knn_predict(q, b, y, c, k=7)
    with pytest.raises(ValueError, match="k must be a positive int"):
        knn_predict(q, b, y, c, k=0)


# ------------------------------------------------------------------------------------- topk_accuracy


def test_topk_accuracy_hand_cases():
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.0, 0.9, 0.3],  # ranking 4, 1, 5, 2, 0, 3
            [2.0, 1.0, 0.0, -1.0, -2.0, -3.0],  # ranking 0, 1, 2, 3, 4, 5
            [0.0, 0.0, 1.0, 0.5, 0.7, 0.6],  # ranking 2, 4, 5, 3, then 0/1 tied last
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # ranking 0, 1, 2, 3, 4, 5
        ]
    )
    targets = torch.tensor([4, 2, 3, 5])
    # Ranks of the targets: 1, 3, 4, 6  -> top-1: 1/4, top-3: 2/4, top-5: 3/4.
    acc = topk_accuracy(scores, targets, ks=(1, 3, 5))
    assert acc == {1: 25.0, 3: 50.0, 5: 75.0}


def test_topk_accuracy_with_fewer_classes_than_k():
    scores = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]])
    targets = torch.tensor([1, 1, 0])
    acc = topk_accuracy(scores, targets)  # default ks=(1, 5), only 2 classes
    assert acc[1] == pytest.approx(100.0 / 3)
    assert acc[5] == 100.0


def test_topk_accuracy_rejects_bad_input():
    scores = torch.rand(3, 4)
    with pytest.raises(ValueError, match="one entry per score row"):
        topk_accuracy(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, C=4\)"):
        topk_accuracy(scores, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="ks must be"):
        topk_accuracy(scores, torch.tensor([0, 1, 2]), ks=(0,))
    with pytest.raises(ValueError, match="NaN"):
        topk_accuracy(torch.full((3, 4), float("nan")), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="empty"):
        topk_accuracy(torch.rand(0, 4), torch.zeros(0, dtype=torch.long))


def test_end_to_end_accuracy_on_separable_clusters():
    # Three well-separated clusters: both classifiers must get every query right.
    g = torch.Generator().manual_seed(11)
    centres = torch.eye(3, 8) * 10
    bank_labels = torch.arange(3).repeat_interleave(20)
    bank = centres[bank_labels] + torch.randn(60, 8, generator=g)
    targets = torch.arange(3).repeat(10)
    queries = centres[targets] + torch.randn(30, 8, generator=g)
    for scores in (
        soft_nn_predict(queries, bank, bank_labels, 3),
        knn_predict(queries, bank, bank_labels, 3, k=5),
    ):
        assert topk_accuracy(scores, targets, ks=(1,)) == {1: 100.0}


# ------------------------------------------------------------------------------------- embed_batches


def test_embed_batches_runs_in_batches_under_inference_mode():
    images = torch.arange(30, dtype=torch.float64).reshape(10, 3)
    seen: list[tuple[int, bool]] = []
    linear = torch.nn.Linear(3, 2).double()

    def fn(x):
        seen.append((x.shape[0], torch.is_inference_mode_enabled()))
        return linear(x)

    out = embed_batches(fn, images, batch_size=4)
    assert seen == [(4, True), (4, True), (2, True)]
    assert out.dtype == torch.float32 and out.device.type == "cpu" and not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, linear(images).float())


def _nan_on_second_call():
    calls = [0]

    def fn(x):
        calls[0] += 1
        return x * float("nan") if calls[0] == 2 else x

    return fn


def test_embed_batches_rejects_bad_outputs():
    images = torch.rand(5, 3)
    with pytest.raises(ValueError, match=r"\(2, D\) tensor for images\[0:2\]"):
        embed_batches(lambda x: x[:1], images, batch_size=2)
    with pytest.raises(ValueError, match=r"non-finite embeddings for images\[2:4\]"):
        embed_batches(_nan_on_second_call(), images, batch_size=2)
    with pytest.raises(ValueError, match=r"D=2 for images\[4:5\] but D=3"):
        embed_batches(lambda x: x[:, :2] if x.shape[0] == 1 else x, images, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        embed_batches(lambda x: x, images, batch_size=0)
    with pytest.raises(ValueError, match="non-empty"):
        embed_batches(lambda x: x, images[:0], batch_size=2)
