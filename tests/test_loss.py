"""The PAWS loss against a hand-computed case, an independent float64 computation and Proposition 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from paws_cli.losses import paws_health, paws_loss, paws_loss_terms, sharpen, snn, support_label_matrix


def _reference_loss_f64(anchor, anchor_sup, labels, target, target_sup, tau, T, multicrop, me_max):
    """Independent numpy float64 re-computation of spec section 1 (no torch)."""

    def normalize(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def soft_nn(q, s):
        logits = normalize(q) @ normalize(s).T / tau
        logits -= logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        return (w / w.sum(axis=1, keepdims=True)) @ labels

    def sharp(p):
        p = p ** (1.0 / T)
        return p / p.sum(axis=1, keepdims=True)

    b = target.shape[0] // 2
    probs = soft_nn(anchor, anchor_sup)
    t = sharp(soft_nn(target, target_sup))
    rows = [t[b:], t[:b]] + [(t[:b] + t[b:]) / 2] * multicrop
    targets = np.concatenate(rows)
    targets[targets < 1e-4] = 0
    ce = np.mean(np.sum(np.where(targets > 0, -targets * np.log(probs), 0.0), axis=1))
    pbar = sharp(probs).mean(axis=0)
    reg = float(np.sum(pbar * np.log(pbar))) if me_max else 0.0
    return ce, reg


def _random_inputs(b=5, m=3, s=12, classes=4, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn((2 + m) * b, d, generator=g, dtype=dtype)
    anchor_sup = torch.randn(s, d, generator=g, dtype=dtype)
    target = torch.randn(2 * b, d, generator=g, dtype=dtype)
    target_sup = torch.randn(s, d, generator=g, dtype=dtype)
    ids = torch.arange(s) % classes
    return anchor, anchor_sup, support_label_matrix(ids, 0.1), target, target_sup


@pytest.mark.parametrize("multicrop,me_max", [(0, True), (3, True), (3, False)])
def test_loss_matches_float64_reference(multicrop: int, me_max: bool) -> None:
    anchor, anchor_sup, labels, target, target_sup = _random_inputs(m=multicrop)
    ce, reg = paws_loss(
        anchor,
        anchor_sup,
        labels,
        target,
        target_sup,
        tau=0.1,
        sharpen_T=0.25,
        multicrop=multicrop,
        me_max=me_max,
    )
    ref_ce, ref_reg = _reference_loss_f64(
        *(x.double().numpy() for x in (anchor, anchor_sup, labels, target, target_sup)),
        0.1,
        0.25,
        multicrop,
        me_max,
    )
    assert ce.dtype == torch.float32
    assert ce.item() == pytest.approx(ref_ce, rel=1e-5, abs=1e-6)
    assert reg.item() == pytest.approx(ref_reg, rel=1e-5, abs=1e-6)


def test_gradient_matches_float64_autograd() -> None:
    """Gradients into anchors and supports equal a float64 torch re-derivation written from the spec."""
    anchor, anchor_sup, labels, target, target_sup = _random_inputs(m=2, seed=3)
    a32, s32 = anchor.clone().requires_grad_(), anchor_sup.clone().requires_grad_()
    ce, reg = paws_loss(a32, s32, labels, target, target_sup, multicrop=2)
    (ce + reg).backward()

    a64, s64 = anchor.double().requires_grad_(), anchor_sup.double().requires_grad_()
    y = labels.double()
    b = target.shape[0] // 2

    def soft_nn(q, s):
        q = q / q.norm(dim=1, keepdim=True)
        s = s / s.norm(dim=1, keepdim=True)
        return torch.softmax(q @ s.T / 0.1, dim=1) @ y

    def sharp(p):
        return p**4 / (p**4).sum(dim=1, keepdim=True)

    with torch.no_grad():
        t = sharp(soft_nn(target.double(), target_sup.double()))
        targets = torch.cat([t[b:], t[:b], (t[:b] + t[b:]) / 2, (t[:b] + t[b:]) / 2])
        targets[targets < 1e-4] = 0
    p = soft_nn(a64, s64)
    loss64 = -(targets * torch.log(p)).sum(dim=1).mean()
    pbar = sharp(p).mean(dim=0)
    (loss64 + (pbar * torch.log(pbar)).sum()).backward()
    torch.testing.assert_close(a32.grad.double(), a64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


def test_hand_computed_two_class_case() -> None:
    """One image, two orthogonal supports, no smoothing: every number below is written out by hand."""
    tau, T = 0.1, 0.25
    supports = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.eye(2)
    view1, view2 = [1.0, 0.0], [0.6, 0.8]  # unit vectors: cos with supports are (1, 0) and (0.6, 0.8)
    anchors = torch.tensor([view1, view2])
    ce, reg = paws_loss(anchors, supports, labels, anchors.clone(), supports.clone(), tau=tau, sharpen_T=T)

    def softmax2(a: float, b: float) -> list[float]:
        ea, eb = math.exp(a / tau), math.exp(b / tau)
        return [ea / (ea + eb), eb / (ea + eb)]

    def sharpen2(p: list[float]) -> list[float]:
        q = [x ** (1 / T) for x in p]
        return [x / sum(q) for x in q]

    p1, p2 = softmax2(1.0, 0.0), softmax2(0.6, 0.8)
    t1, t2 = sharpen2(p2), sharpen2(p1)  # swapped: view 1 is taught by view 2 and back
    t1 = [x if x >= 1e-4 else 0.0 for x in t1]
    t2 = [x if x >= 1e-4 else 0.0 for x in t2]
    expected_ce = -0.5 * (
        sum(t * math.log(p) for t, p in zip(t1, p1)) + sum(t * math.log(p) for t, p in zip(t2, p2))
    )
    s1, s2 = sharpen2(p1), sharpen2(p2)
    pbar = [(s1[0] + s2[0]) / 2, (s1[1] + s2[1]) / 2]
    expected_reg = sum(x * math.log(x) for x in pbar)
    assert ce.item() == pytest.approx(expected_ce, rel=1e-5)
    assert reg.item() == pytest.approx(expected_reg, rel=1e-5)
    assert reg.item() + math.log(2) >= 0.0  # KL(pbar || uniform)


def test_proposition_1_collapse_gives_uniform_predictions_and_nonzero_gradient() -> None:
    classes, per_class, b, d = 4, 3, 6, 16
    z = torch.randn(d)
    ids = torch.arange(classes).repeat(per_class)
    labels = support_label_matrix(ids, smoothing=0.1)
    collapsed_supports = z.repeat(classes * per_class, 1)
    collapsed_views = z.repeat(2 * b, 1)
    probs = snn(collapsed_views, collapsed_supports, labels, tau=0.1)
    torch.testing.assert_close(probs, torch.full_like(probs, 1.0 / classes))
    # Targets come from sharpening a non-uniform prediction, so they are not uniform ...
    target_views = torch.randn(2 * b, d)
    target_supports = torch.randn(classes * per_class, d)
    terms = paws_loss_terms(collapsed_views, collapsed_supports, labels, target_views, target_supports)
    assert (terms.targets.max(dim=1).values > 1.0 / classes + 1e-3).all()
    # ... so the collapsed point is not stationary for the classifier's similarity logits (the paper's claim).
    logits = torch.zeros(2 * b, classes * per_class, requires_grad=True)  # equal similarities = collapse
    ce = -torch.xlogy(terms.targets, torch.softmax(logits, dim=1) @ labels).sum(dim=1).mean()
    ce.backward()
    assert logits.grad.abs().max().item() > 1e-3
    # Exactly at collapse the cosine similarity is flat, so the gradient into the embeddings vanishes; any
    # departure from it (here 1e-2) gives a non-zero gradient that the sharpened targets keep driving.
    views = (collapsed_views + 1e-2 * torch.randn(2 * b, d)).requires_grad_()
    supports = (collapsed_supports + 1e-2 * torch.randn(classes * per_class, d)).requires_grad_()
    near = paws_loss_terms(views, supports, labels, target_views, target_supports)
    torch.testing.assert_close(near.probs, torch.full_like(near.probs, 1.0 / classes), atol=0.02, rtol=0)
    near.ce.backward()
    assert views.grad.norm().item() > 1e-3 and supports.grad.norm().item() > 1e-3
    # The health signal reports the collapse as chance-level support accuracy.
    assert paws_health(terms, tau=0.1)["support_accuracy"] <= 1.0 / classes + 1e-6


def test_sharpen_hand_case_and_invariants() -> None:
    p = torch.tensor([[0.5, 0.25, 0.25]])
    torch.testing.assert_close(sharpen(p, 0.5), torch.tensor([[2 / 3, 1 / 6, 1 / 6]]))
    torch.testing.assert_close(sharpen(p, 1.0), p)
    q = torch.softmax(torch.randn(50, 7), dim=1)
    s = sharpen(q, 0.25)
    torch.testing.assert_close(s.sum(dim=1), torch.ones(50))
    entropy = lambda x: -(x * x.log()).sum(dim=1)  # noqa: E731
    assert (entropy(s) <= entropy(q) + 1e-6).all()
    assert torch.equal(s.argmax(dim=1), q.argmax(dim=1))
    with pytest.raises(ValueError, match="temperature"):
        sharpen(q, 0.0)


def test_support_label_matrix_rows() -> None:
    ids = torch.tensor([7, 3, 7, 3, 9])
    y = support_label_matrix(ids, smoothing=0.1)
    c = 3  # classes present: 3, 7, 9 -> columns 0, 1, 2
    assert y.shape == (5, c)
    torch.testing.assert_close(y.sum(dim=1), torch.ones(5))
    on, off = 1 - 0.1 + 0.1 / c, 0.1 / c
    expected = torch.full((5, c), off)
    for row, col in enumerate([1, 0, 1, 0, 2]):
        expected[row, col] = on
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(support_label_matrix(ids, 0.0), torch.eye(3)[[1, 0, 1, 0, 2]])
    with pytest.raises(ValueError, match="smoothing"):
        support_label_matrix(ids, 1.0)


def test_targets_are_swapped_averaged_and_floored() -> None:
    anchor, anchor_sup, labels, target, target_sup = _random_inputs(b=4, m=2, seed=5)
    terms = paws_loss_terms(anchor, anchor_sup, labels, target, target_sup, multicrop=2)
    t = sharpen(snn(target, target_sup, labels, 0.1), 0.25)
    expected = torch.cat([t[4:], t[:4], (t[:4] + t[4:]) / 2, (t[:4] + t[4:]) / 2])
    expected[expected < 1e-4] = 0
    torch.testing.assert_close(terms.targets, expected)
    assert terms.targets.shape == (16, labels.shape[1])


def test_loss_is_float32_under_bf16_autocast() -> None:
    anchor, anchor_sup, labels, target, target_sup = _random_inputs(seed=9, m=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, reg = paws_loss(
            anchor.bfloat16(),
            anchor_sup.bfloat16(),
            labels,
            target.bfloat16(),
            target_sup.bfloat16(),
            multicrop=3,
        )
    assert ce.dtype == torch.float32 and reg.dtype == torch.float32
    ref_ce, _ = paws_loss(anchor, anchor_sup, labels, target, target_sup, multicrop=3)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=0.05)


def test_shape_errors_name_the_problem() -> None:
    anchor, anchor_sup, labels, target, target_sup = _random_inputs(b=5, m=3)
    with pytest.raises(ValueError, match="multicrop"):
        paws_loss(anchor, anchor_sup, labels, target, target_sup, multicrop=2)
    with pytest.raises(ValueError, match="support label rows"):
        paws_loss(anchor, anchor_sup[:-1], labels, target, target_sup, multicrop=3)
