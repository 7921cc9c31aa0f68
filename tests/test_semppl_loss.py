"""The SemPPL loss (SEMPPL-SPEC.md section 7) against hand-computed cases and an independent float64 loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from paws_cli.losses import semppl_loss

C, ALPHA, LAM = 0.3, 0.2, 5.0


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _kl(a: np.ndarray, b: np.ndarray) -> float:
    lp, lq = _log_softmax(a), _log_softmax(b)
    return float(np.sum(np.exp(lp) * (lp - lq)))


def _reference_f64(online, targets, negatives, sem_pos, valid, anchor, tau, inv_mode, over):
    """Spec 7.1-7.5 written as explicit loops over pairs, draws and anchors, in numpy float64 (no torch)."""
    o, t, z = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (online, targets, sem_pos))
    V, L, B, S = o.shape[0], t.shape[0], negatives.shape[0], z.shape[1]
    by_candidate = over == "onlines" or inv_mode == "rowcol"

    def logits(side, v, j, n, s=None):
        """(online v, target j) logits of anchor n; slot 0 holds t_j(n), or z_{j,s}(n) for draw s."""
        own = o[v, anchor[n]] if by_candidate else o[v, n]
        pos = t[j, anchor[n]] if s is None else z[j, s, n]
        if side == "targets":  # online anchor, target candidates
            return np.array([own @ x for x in [pos, *t[j, negatives[n]]]]) / tau
        return np.array([pos @ x for x in [own, *o[v, negatives[n]]]]) / tau  # the reverse

    def mean(values):  # 0 for an empty set (no valid anchor, or no draw)
        return float(np.mean(values)) if len(values) else 0.0

    ce = lambda x: -_log_softmax(x)[0]  # noqa: E731
    pairs = [(v, j) for v in range(V) for j in range(L)]
    swaps = [(i, j) for i in range(L) for j in range(L) if i != j]
    augm = mean([ce(logits(over, v, j, n)) for v, j in pairs for n in range(B)])
    sem = [
        [ce(logits(over, v, j, n, s)) for n in range(B) if valid[j, s, n]] for v, j in pairs for s in range(S)
    ]
    sempos = mean([mean(x) for x in sem])
    inv_a = inv_s = 0.0
    if inv_mode == "swap":
        inv_a = mean([_kl(logits(over, i, j, n), logits(over, j, i, n)) for i, j in swaps for n in range(B)])
        inv_s = mean(
            [
                mean(
                    [
                        _kl(logits(over, i, j, n, s), logits(over, j, i, n, s))
                        for n in range(B)
                        if valid[[i, j], s, n].all()
                    ]
                )
                for i, j in swaps
                for s in range(S)
            ]
        )
    elif inv_mode == "rowcol":
        other = "onlines" if over == "targets" else "targets"
        inv_a = mean([_kl(logits(over, v, j, n), logits(other, v, j, n)) for v, j in pairs for n in range(B)])
        inv_s = mean(
            [
                mean(
                    [
                        _kl(logits(over, v, j, n, s), logits(other, v, j, n, s))
                        for n in range(B)
                        if valid[j, s, n]
                    ]
                )
                for v, j in pairs
                for s in range(S)
            ]
        )
    return augm, sempos, inv_a, inv_s, C * (augm + ALPHA * sempos) + LAM * (inv_a + inv_s)


KW = {"tau": 0.2, "c": C, "alpha": ALPHA, "lam": LAM}
NAMES = ("online", "targets", "negatives", "sem_pos", "sem_valid", "anchor_index")


def _inputs(L=3, S=1, B=4, B_all=7, n_e=3, n_sp=2, D=5, seed=0, by_candidate=False) -> dict:
    """Random arguments of semppl_loss by name; the local anchors sit at random candidate positions."""
    g = torch.Generator().manual_seed(seed)
    anchor = torch.arange(B) if B_all == B else torch.randperm(B_all, generator=g)[:B]
    # Negatives: n_e distinct candidates other than the anchor itself, one set per anchor.
    perms = [torch.randperm(B_all, generator=g).tolist() for _ in range(B)]
    negatives = torch.tensor([[m for m in perm if m != a][:n_e] for perm, a in zip(perms, anchor.tolist())])
    online = torch.randn(L + S, B_all if by_candidate else B, D, generator=g)
    targets = torch.randn(L, B_all, D, generator=g)
    sem_pos = torch.randn(L, n_sp, B, D, generator=g)
    valid = torch.rand(L, n_sp, B, generator=g) < 0.6
    valid[0, 0] = False  # one (j, s) with no valid anchor at all
    valid[1, 1] = True
    return dict(zip(NAMES, (online, targets, negatives, sem_pos, valid, anchor)))


@pytest.mark.parametrize("over", ["targets", "onlines"])
@pytest.mark.parametrize("inv_mode", ["swap", "rowcol", "off"])
def test_matches_float64_reference(inv_mode: str, over: str) -> None:
    args = _inputs(by_candidate=over == "onlines" or inv_mode == "rowcol")
    terms = semppl_loss(**args, **KW, inv_mode=inv_mode, softmax_over=over)
    ref = _reference_f64(*(args[k].numpy() for k in NAMES), 0.2, inv_mode, over)
    got = [terms.augm, terms.sempos, terms.inv_augm, terms.inv_sempos, terms.total]
    for value, expected in zip(got, ref):
        assert value.dtype == torch.float32 and value.shape == ()
        assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # The penalties are really exercised (and really absent when off).
    assert (min(ref[2], ref[3]) > 1e-4) if inv_mode != "off" else (ref[2] == ref[3] == 0.0)


def test_hand_computed_one_large_one_small_view() -> None:
    """V=2 (L=1, S=1), B=2, n_e=1 (each anchor's negative is the other image), N_sp=1, tau=0.5."""
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    online = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, 0.6]]])  # large view, small view
    negatives = torch.tensor([[1], [0]])
    sem_pos = torch.tensor([[[[0.6, 0.8], [100.0, -3.0]]]])  # anchor 1's positive is invalid: never read
    valid = torch.tensor([[[True, False]]])
    terms = semppl_loss(online, targets, negatives, sem_pos, valid, tau=0.5, c=C, alpha=ALPHA, lam=LAM)
    # 2-slot logits [pos, neg] / 0.5 give -log softmax[0] = softplus(2 * (neg - pos)).
    # Large view: pos 1, neg 0 for both anchors -> softplus(-2) = 0.126928.
    # Small view: anchor 0 [.6,.8] vs t(0)=[1,0] 0.6 and t(1)=[0,1] 0.8; anchor 1 likewise -> softplus(0.4) = 0.913015.
    augm = (_softplus(-2.0) + _softplus(0.4)) / 2  # 0.519972: mean over the V*L = 2 pairs
    # Semantic: anchor 0 only. Large: <[1,0],[.6,.8]> = 0.6 vs neg 0 -> softplus(-1.2) = 0.263182;
    # small: <[.6,.8],[.6,.8]> = 1 vs neg 0.8 -> softplus(-0.4) = 0.513015.
    sempos = (_softplus(-1.2) + _softplus(-0.4)) / 2  # 0.388149: normaliser V*L*N_sp = 2
    assert terms.augm.item() == pytest.approx(augm, rel=1e-6)
    assert terms.sempos.item() == pytest.approx(sempos, rel=1e-6)
    assert terms.inv_augm.item() == 0.0 and terms.inv_sempos.item() == 0.0  # L = 1: no swapped pair
    assert terms.total.item() == pytest.approx(C * (augm + ALPHA * sempos), rel=1e-6)  # 0.179280


def test_hand_computed_swap_kl_with_gathered_candidates() -> None:
    """L=2, S=0, one local anchor at candidate 0 of B_all=2, its negative is candidate 1, tau=1."""
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, 0.6]]])
    online = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    no_sp, no_valid = torch.zeros(2, 0, 1, 2), torch.zeros(2, 0, 1, dtype=torch.bool)
    one = torch.tensor([0])
    terms = semppl_loss(
        online, targets, torch.tensor([[1]]), no_sp, no_valid, **(KW | {"tau": 1.0}), anchor_index=one
    )
    # (online 0, target 1): [0.6, 0.8]; (online 1, target 0): [0, 1]; (0,0): [1, 0]; (1,1): [0.8, 0.6].
    augm = (_softplus(-1.0) + _softplus(0.2) + _softplus(1.0) + _softplus(-0.2)) / 4  # 0.755700
    p01 = [1 / (1 + math.exp(0.2)), 1 / (1 + math.exp(-0.2))]  # softmax([0.6, 0.8]) = [0.450166, 0.549834]
    p10 = [1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-1.0))]  # softmax([0, 1]) = [0.268941, 0.731059]
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    inv = (kl(p01, p10) + kl(p10, p01)) / 2  # (0.075256 + 0.069724) / 2 = 0.072490
    assert terms.augm.item() == pytest.approx(augm, rel=1e-6)
    assert terms.inv_augm.item() == pytest.approx(inv, rel=1e-5)
    assert terms.sempos.item() == 0.0 and terms.inv_sempos.item() == 0.0
    assert terms.total.item() == pytest.approx(C * augm + LAM * inv, rel=1e-5)


def test_no_semantic_positives_and_no_penalty_give_the_plain_contrastive_term() -> None:
    args = _inputs(B=5, B_all=5, seed=1)
    plain_args = args | {"sem_pos": args["sem_pos"][:, :0], "sem_valid": args["sem_valid"][:, :0]}
    plain = semppl_loss(**plain_args, **(KW | {"lam": 0.0}))
    assert plain.sempos.item() == 0.0 and plain.inv_sempos.item() == 0.0
    assert plain.total.item() == pytest.approx(C * plain.augm.item(), rel=1e-6)
    # ReLICv2-style cross-entropy built directly: class 0 of [<o_v(n), t_j(n)>, <o_v(n), t_j(N_n)>] / tau.
    o, t = (torch.nn.functional.normalize(args[k], dim=-1) for k in ("online", "targets"))
    neg = args["negatives"]
    ce = [
        torch.nn.functional.cross_entropy(
            torch.cat([(o[v] * t[j]).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", o[v], t[j][neg])], 1)
            / 0.2,
            torch.zeros(5, dtype=torch.long),
        )
        for v in range(o.shape[0])
        for j in range(t.shape[0])
    ]
    assert plain.augm.item() == pytest.approx(torch.stack(ce).mean().item(), rel=1e-5)
    with_sp = semppl_loss(**args, **(KW | {"lam": 0.0}))
    assert with_sp.augm.item() == pytest.approx(plain.augm.item(), rel=1e-6)  # positives never touch L_AUGM
    # With the penalty on, it adds exactly lam * I_AUGM (I_SEMPOS = 0 without draws).
    swap = semppl_loss(**plain_args, **KW)
    assert swap.total.item() == pytest.approx(C * plain.augm.item() + LAM * swap.inv_augm.item(), rel=1e-6)


def test_penalty_is_zero_for_identical_view_pairs() -> None:
    args = _inputs(L=2, S=2, seed=2)
    for k in ("online", "targets", "sem_pos", "sem_valid"):
        args[k][1] = args[k][0]  # large view 1 == large view 0, its queue draws too
    terms = semppl_loss(**args, **KW)
    assert abs(terms.inv_augm.item()) < 1e-6 and abs(terms.inv_sempos.item()) < 1e-6
    assert terms.augm.item() > 0.1
    # rowcol compares one pair's two orientations, equal when every online candidate equals the target and
    # both target views agree (they do since the line above).
    no_sp = {"sem_pos": args["sem_pos"][:, :0], "sem_valid": args["sem_valid"][:, :0]}
    rowcol = semppl_loss(**(args | no_sp | {"online": args["targets"].clone()}), **KW, inv_mode="rowcol")
    assert abs(rowcol.inv_augm.item()) < 1e-6


@pytest.mark.parametrize("over", ["targets", "onlines"])
def test_gradient_reaches_only_online(over: str) -> None:
    args = _inputs(by_candidate=over == "onlines", seed=3)
    for k in ("online", "targets", "sem_pos"):
        args[k].requires_grad_()
    semppl_loss(**args, **KW, softmax_over=over).total.backward()
    assert args["targets"].grad is None and args["sem_pos"].grad is None
    grad = args["online"].grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if over == "onlines":  # the negatives' online rows are candidates, so they are trained too
        assert grad[:, args["negatives"].flatten()].abs().sum() > 0


def test_swap_penalty_gradient_stops_at_the_swapped_side() -> None:
    """Gradient of I_AUGM alone against a float64 pair-by-pair autograd with an explicit detach."""
    args = _inputs(L=3, S=0, seed=4)
    online, targets, negatives, anchor = (args[k] for k in ("online", "targets", "negatives", "anchor_index"))
    x = online.clone().requires_grad_()
    no_sp = {"sem_pos": args["sem_pos"][:, :0], "sem_valid": args["sem_valid"][:, :0]}
    semppl_loss(**(args | no_sp | {"online": x}), tau=0.2, c=0.0, alpha=0.0, lam=1.0).total.backward()
    o64 = online.double().requires_grad_()
    o = o64 / o64.norm(dim=-1, keepdim=True)
    t = targets.double() / targets.double().norm(dim=-1, keepdim=True)

    def log_p(i: int, j: int) -> torch.Tensor:
        cand = torch.cat([t[j][anchor][:, None], t[j][negatives]], dim=1)  # (B, 1+n_e, D)
        return torch.log_softmax(torch.einsum("bd,bkd->bk", o[i], cand) / 0.2, dim=1)

    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    kls = [(log_p(i, j).exp() * (log_p(i, j) - log_p(j, i).detach())).sum(1).mean() for i, j in pairs]
    torch.stack(kls).mean().backward()
    torch.testing.assert_close(x.grad.double(), o64.grad, rtol=1e-4, atol=1e-6)


def test_masks_are_honoured_and_no_valid_anchor_gives_zero() -> None:
    args = _inputs(seed=5)
    sem_pos, valid = args["sem_pos"], args["sem_valid"]
    base = semppl_loss(**args, **KW)
    garbage = torch.where(valid[..., None], sem_pos, torch.full_like(sem_pos, float("nan")))
    masked = semppl_loss(**(args | {"sem_pos": garbage}), **KW)
    for name in ("sempos", "inv_sempos", "total"):
        assert getattr(masked, name).item() == pytest.approx(getattr(base, name).item(), rel=1e-6)
    moved = semppl_loss(**(args | {"sem_pos": sem_pos + 3.0 * valid[..., None]}), **KW)
    assert abs(moved.sempos.item() - base.sempos.item()) > 1e-4
    x = args["online"].clone().requires_grad_()
    none = semppl_loss(
        **(args | {"online": x, "sem_pos": garbage, "sem_valid": torch.zeros_like(valid)}), **KW
    )
    assert none.sempos.item() == 0.0 and none.inv_sempos.item() == 0.0
    none.total.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(none.total)


def test_float32_under_bf16_autocast() -> None:
    args = _inputs(seed=6)
    ref = semppl_loss(**args, **KW)
    low_args = args | {k: args[k].bfloat16() for k in ("online", "targets", "sem_pos")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = semppl_loss(**low_args, **KW)
    assert low.total.dtype == torch.float32
    assert low.total.item() == pytest.approx(ref.total.item(), rel=0.05)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"online": torch.zeros(4, 5, 5)}, "online must have shape"),  # B=4 rows expected
        ({"online": torch.zeros(2, 4, 5)}, r"online must have shape \(V >= L=3"),
        ({"targets": torch.zeros(3, 7)}, "targets must have shape"),
        ({"negatives": torch.zeros(4, 3)}, "negatives must be a"),  # float, not long
        ({"sem_pos": torch.zeros(3, 2, 5, 5)}, r"sem_pos must have shape \(L=3, N_sp, B=4, D=5\)"),
        ({"sem_valid": torch.zeros(3, 2, 4)}, "sem_valid must be a bool"),
        ({"anchor_index": torch.arange(3)}, r"anchor_index must be a \(4,\) long"),
        ({"anchor_index": None}, "anchor_index is required"),
        ({"inv_mode": "kl"}, "inv_mode"),
        ({"softmax_over": "queue"}, "softmax_over"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"online": torch.zeros(4, 4, 5), "softmax_over": "onlines"}, r"B_all=7"),
    ],
)
def test_shape_errors_name_the_argument(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        semppl_loss(**(_inputs() | KW | change))
