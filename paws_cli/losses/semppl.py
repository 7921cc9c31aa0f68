"""The SemPPL loss (Bošnjak et al., ICLR 2023) on plain tensors.

Spec: SEMPPL-SPEC.md section 7 (7.1 logits with shared subsampled negatives, 7.2 L_AUGM, 7.3 L_SEMPOS,
7.4 invariance penalties, 7.5 total) and the loss block of the training step in section 8.

Every (anchor, slot set) produces 1 + n_e logits ``[<u, positive>, <u, negative_1..n_e>] / tau``; the
contrastive terms are ``-log softmax[0]`` and the invariance terms compare two such slot-aligned
distributions with a KL. The negative index set of an anchor is drawn once per step and shared by every view
pair and every semantic draw, which is what makes the distributions of different pairs slot-aligned (7.1).

Orientation (``softmax_over``, 7.1):

- ``"targets"`` (default): the online vector o_v(n) is the anchor; the candidates are target vectors
  t_j(n), t_j(m in N_n) (or the queue vector z_{j,s}(n) in slot 0). ``online`` is (V, B, D), one row per local
  anchor. Only ``online`` receives gradient.
- ``"onlines"`` ([3P]): the target or queue vector is the anchor and the candidates are online vectors
  o_v(n), o_v(m in N_n), so ``online`` must hold a row for every candidate: (V, B_all, D), e.g. gathered with
  ``torch.distributed.nn.functional.all_gather`` so that gradient reaches every process's rows. The local
  anchors' rows are ``online[:, anchor_index]``.

Targets and queue vectors are constants in both orientations (they are detached here). Everything is computed
in float32, whatever the autocast state of the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

INV_MODES = ("swap", "rowcol", "off")
ORIENTATIONS = ("targets", "onlines")


@dataclass(frozen=True)
class SemPPLLossTerms:
    """The four 0-d float32 terms of spec 7.5 and their weighted sum ``total`` (the quantity to minimise)."""

    augm: Tensor
    sempos: Tensor
    inv_augm: Tensor
    inv_sempos: Tensor
    total: Tensor


def _shape_error(name: str, expected: str, got: Tensor) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(got.shape)}")


def _logits(
    over: str, o_anchor: Tensor, o_cand: Tensor | None, t_pos: Tensor, t_neg: Tensor, z: Tensor, tau: float
) -> tuple[Tensor, Tensor]:
    """Logits (V, L, B, 1+n_e) of the augmentation pairs and (V, L, N_sp, B, 1+n_e) of the semantic ones.

    o_anchor (V, B, D): online rows of the local anchors; o_cand (V, B, n_e, D): online rows of their negatives
    (only for ``over == "onlines"``); t_pos (L, B, D); t_neg (L, B, n_e, D); z (L, N_sp, B, D).
    Slot 0 is the same dot product in both orientations; only the negative slots differ.
    """
    aug_pos = torch.einsum("vbd,lbd->vlb", o_anchor, t_pos)
    sem_pos = torch.einsum("vbd,lsbd->vlsb", o_anchor, z)
    if over == "targets":
        aug_neg = torch.einsum("vbd,lbkd->vlbk", o_anchor, t_neg)
        # The semantic pairs reuse the target negatives of the same (v, j) pair (7.3).
        sem_neg = aug_neg[:, :, None].expand(-1, -1, z.shape[1], -1, -1)
    else:
        assert o_cand is not None
        aug_neg = torch.einsum("lbd,vbkd->vlbk", t_pos, o_cand)
        sem_neg = torch.einsum("lsbd,vbkd->vlsbk", z, o_cand)
    aug = torch.cat([aug_pos[..., None], aug_neg], dim=-1) / tau
    sem = torch.cat([sem_pos[..., None], sem_neg], dim=-1) / tau
    return aug, sem


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || sg[q]) over the last (slot) axis, from log-probabilities; q gets no gradient."""
    return (log_p.exp() * (log_p - log_q.detach())).sum(dim=-1)


def _masked_anchor_mean(values: Tensor, valid: Tensor, valid_all: Tensor | None = None) -> Tensor:
    """Mean over the last (anchor) axis restricted to ``valid``; 0 (not NaN) where no anchor is valid.

    ``torch.where`` (rather than multiplying by the mask) keeps a non-finite value of an invalid anchor out of
    both the value and the gradient. With ``valid_all`` (the same mask over the B_all anchors of the global
    batch, this process's B among them) the local sum is divided by the global count times B / B_all: the mean
    over processes (what DDP does to gradients) is then the global batch's mean over its valid anchors, however
    the valid anchors are spread over the processes.
    """
    total = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=-1)
    if valid_all is None:
        return total / valid.sum(dim=-1).clamp(min=1).to(values.dtype)
    share = valid.shape[-1] / valid_all.shape[-1]
    return total / (valid_all.sum(dim=-1).clamp(min=1).to(values.dtype) * share)


def _offdiag_mean(values: Tensor) -> Tensor:
    """Mean over the ordered pairs i != j of the first two (L, L) axes, anchors already reduced or not."""
    num_large = values.shape[0]
    keep = ~torch.eye(num_large, dtype=torch.bool, device=values.device)
    return values[keep].mean()


def _invariance(
    inv_mode: str,
    softmax_over: str,
    log_aug: Tensor,
    log_sem: Tensor,
    vectors: tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor],
    tau: float,
    sem_valid: Tensor,
    sem_valid_all: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(I_AUGM, I_SEMPOS) of spec 7.4 for ``inv_mode`` (see ``semppl_loss``)."""
    zero = torch.zeros((), dtype=torch.float32, device=log_aug.device)
    inv_augm, inv_sempos = zero, zero
    num_large, num_sp = sem_valid.shape[0], sem_valid.shape[1]
    valid_all = None if sem_valid_all is None else sem_valid_all[None]
    if inv_mode == "swap" and num_large > 1:
        # Axis 0 indexes the online large view i, axis 1 the target view j, so transposing them gives (j, i).
        large_aug = log_aug[:num_large]
        inv_augm = _offdiag_mean(_kl(large_aug, large_aug.transpose(0, 1)))
        if num_sp:
            large_sem = log_sem[:num_large]
            both = sem_valid[None] & sem_valid[:, None]  # [i, j, s, n]: valid for queue j and queue i
            both_all = None if sem_valid_all is None else sem_valid_all[None] & sem_valid_all[:, None]
            inv_sempos = _offdiag_mean(
                _masked_anchor_mean(_kl(large_sem, large_sem.transpose(0, 1)), both, both_all)
            )
    elif inv_mode == "rowcol":
        other = "onlines" if softmax_over == "targets" else "targets"
        aug_t, sem_t = _logits(other, *vectors, tau)
        inv_augm = _kl(log_aug, aug_t.log_softmax(dim=-1)).mean()
        if num_sp:
            kl_sem = _kl(log_sem, sem_t.log_softmax(dim=-1))
            inv_sempos = _masked_anchor_mean(kl_sem, sem_valid[None], valid_all).mean()

    return inv_augm, inv_sempos


def _check_inputs(
    online: Tensor,
    targets: Tensor,
    negatives: Tensor,
    sem_pos: Tensor,
    sem_valid: Tensor,
    sem_valid_all: Tensor | None,
    anchor_index: Tensor | None,
    tau: float,
    inv_mode: str,
    softmax_over: str,
) -> tuple[int, int, Tensor]:
    """Check every argument of ``semppl_loss`` (errors name the argument and the expected shape); return
    (L, N_sp, anchor_index)."""
    if inv_mode not in INV_MODES:
        raise ValueError(f"inv_mode must be one of {INV_MODES}, got {inv_mode!r}")
    if softmax_over not in ORIENTATIONS:
        raise ValueError(f"softmax_over must be one of {ORIENTATIONS}, got {softmax_over!r}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if targets.dim() != 3:
        raise _shape_error("targets", "(L, B_all, D)", targets)
    num_large, num_cand, dim = targets.shape
    if negatives.dim() != 2 or negatives.dtype != torch.long:
        raise ValueError(
            f"negatives must be a (B, n_e) long tensor, got {negatives.dtype} {tuple(negatives.shape)}"
        )
    batch = negatives.shape[0]
    needs_candidates = softmax_over == "onlines" or inv_mode == "rowcol"
    rows = num_cand if needs_candidates else batch
    if online.dim() != 3 or online.shape[0] < num_large or online.shape[1:] != (rows, dim):
        expected = f"(V >= L={num_large}, {'B_all' if needs_candidates else 'B'}={rows}, D={dim})"
        raise _shape_error("online", expected, online)
    if sem_pos.dim() != 4 or sem_pos.shape[0] != num_large or sem_pos.shape[2:] != (batch, dim):
        raise _shape_error("sem_pos", f"(L={num_large}, N_sp, B={batch}, D={dim})", sem_pos)
    num_sp = sem_pos.shape[1]
    if sem_valid.shape != sem_pos.shape[:3] or sem_valid.dtype != torch.bool:
        raise ValueError(
            f"sem_valid must be a bool tensor of shape {tuple(sem_pos.shape[:3])}, "
            f"got {sem_valid.dtype} {tuple(sem_valid.shape)}"
        )
    if sem_valid_all is not None and (
        sem_valid_all.shape != (num_large, num_sp, num_cand) or sem_valid_all.dtype != torch.bool
    ):
        raise ValueError(
            f"sem_valid_all must be a bool tensor of shape {(num_large, num_sp, num_cand)}, "
            f"got {sem_valid_all.dtype} {tuple(sem_valid_all.shape)}"
        )
    if anchor_index is None:
        if num_cand != batch:
            raise ValueError(f"anchor_index is required when B_all={num_cand} != B={batch}")
        anchor_index = torch.arange(batch, device=targets.device)
    elif anchor_index.shape != (batch,) or anchor_index.dtype != torch.long:
        raise ValueError(
            f"anchor_index must be a ({batch},) long tensor, got {anchor_index.dtype} {tuple(anchor_index.shape)}"
        )

    return num_large, num_sp, anchor_index


def semppl_loss(
    online: Tensor,
    targets: Tensor,
    negatives: Tensor,
    sem_pos: Tensor,
    sem_valid: Tensor,
    *,
    tau: float,
    c: float,
    alpha: float,
    lam: float,
    anchor_index: Tensor | None = None,
    inv_mode: str = "swap",
    softmax_over: str = "targets",
    sem_valid_all: Tensor | None = None,
) -> SemPPLLossTerms:
    """The SemPPL objective ``c * (L_AUGM + alpha * L_SEMPOS) + lam * (I_AUGM + I_SEMPOS)`` (spec 7.5).

    Args:
        online: online predictions, the L large views first then the S small views. (V, B, D) with one row
            per local anchor, or (V, B_all, D) with one row per candidate when ``softmax_over="onlines"`` or
            ``inv_mode="rowcol"`` (both need the online vectors of the negatives).
        targets: target projections of the L large views for all B_all candidates (L, B_all, D).
        negatives: (B, n_e) long indices into the candidate axis, drawn once per step, never the anchor itself
            (not checked: that would synchronise with the device).
        sem_pos: semantic positives z_{j,s}(n) drawn from queue j (L, N_sp, B, D).
        sem_valid: (L, N_sp, B) bool, False where no positive exists (that z is ignored, whatever it holds).
        tau: temperature; c, alpha, lam: the weights of 7.5.
        anchor_index: (B,) long position of each local anchor in the candidate axis; default arange(B), which
            needs B_all == B.
        inv_mode: "swap" (7.4 recommended), "rowcol" (7.4 alternative) or "off" (zero penalties).

            * swap: for large views i != j, I_AUGM = mean over ordered pairs and anchors of
              KL(p_ij || sg p_ji), p_ij the softmax of the (online i, target j) logits. I_SEMPOS does the same
              with the semantic logits of draw s (slot 0 = z_{j,s}(n) for (i, j), z_{i,s}(n) for (j, i)), a
              mean over the anchors valid in both pairs (0 when none), then a mean over pairs and draws. With
              L = 1 there is no swapped pair and both are 0. Small views have no swapped counterpart.
            * rowcol: inside every (v, j) pair (all V x L pairs, like L_AUGM), KL(p || sg q) where p is the
              softmax of this orientation's logits and q the softmax over the same slot set seen from the
              other side: for ``targets``, p has anchor o_v(n) and candidates t_j(n), t_j(N_n) (a row of the
              online-target similarity matrix) and q has anchor t_j(n) and candidates o_v(n), o_v(N_n) (its
              column); for ``onlines`` the roles swap. The semantic version replaces t_j(n) by z_{j,s}(n) and
              averages over valid anchors per (v, j, s), normaliser V * L * N_sp.
        softmax_over: "targets" (default) or "onlines", see the module docstring.
        sem_valid_all: (L, N_sp, B_all) bool, ``sem_valid`` of every anchor of the global batch (all processes,
            equal per-process batches). When given, the means over valid anchors of L_SEMPOS and I_SEMPOS divide
            by the global number of valid anchors (times B / B_all), so that the processes' values (and, after
            DDP's averaging, gradients) average to those of one process computing the global batch; without it
            each process divides by its own count, which differs from the global mean when the valid anchors
            are not spread evenly. Equal to ``sem_valid`` on one process.

    Returns:
        SemPPLLossTerms of 0-d float32 tensors. L_SEMPOS and I_SEMPOS are 0 when N_sp = 0.
    """
    _, num_sp, anchor_index = _check_inputs(
        online,
        targets,
        negatives,
        sem_pos,
        sem_valid,
        sem_valid_all,
        anchor_index,
        tau,
        inv_mode,
        softmax_over,
    )
    needs_candidates = softmax_over == "onlines" or inv_mode == "rowcol"

    with torch.autocast(device_type=online.device.type, enabled=False):
        o = F.normalize(online.float(), dim=-1)
        t = F.normalize(targets.detach().float(), dim=-1)
        # Invalid positives are zeroed first, so that whatever they hold cannot reach a value or a gradient.
        z = torch.where(sem_valid[..., None], F.normalize(sem_pos.detach().float(), dim=-1), 0.0)
        t_pos, t_neg = t[:, anchor_index], t[:, negatives]
        o_anchor = o[:, anchor_index] if needs_candidates else o
        o_cand = o[:, negatives] if needs_candidates else None
        aug, sem = _logits(softmax_over, o_anchor, o_cand, t_pos, t_neg, z, tau)
        log_aug, log_sem = aug.log_softmax(dim=-1), sem.log_softmax(dim=-1)
        zero = torch.zeros((), dtype=torch.float32, device=online.device)

        # 7.2: the mean over (V, L, B) is 1/(V*L) * sum over pairs of the mean over anchors.
        augm = -log_aug[..., 0].mean()
        # 7.3: per (v, j, s), the mean over valid anchors; normaliser V * L * N_sp.
        valid_all = None if sem_valid_all is None else sem_valid_all[None]
        sempos = _masked_anchor_mean(-log_sem[..., 0], sem_valid[None], valid_all).mean() if num_sp else zero

        inv_augm, inv_sempos = _invariance(
            inv_mode,
            softmax_over,
            log_aug,
            log_sem,
            (o_anchor, o_cand, t_pos, t_neg, z),
            tau,
            sem_valid,
            sem_valid_all,
        )

        total = c * (augm + alpha * sempos) + lam * (inv_augm + inv_sempos)
    return SemPPLLossTerms(augm, sempos, inv_augm, inv_sempos, total)
