"""The PAWS loss (Assran et al., ICCV 2021) on plain tensors.

Anchors (prediction outputs of every unlabelled view) are classified by a soft nearest-neighbour classifier
against the labelled supports; each is pulled towards the sharpened prediction of the *other* large view of the
same image (small views towards the mean of both), and a mean-entropy-maximisation term keeps the average
prediction spread over classes. Spec: PAWS-SPEC.md section 1.

Everything here is computed in float32, whatever the autocast state of the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from paws_cli.collectives import all_reduce_mean, gather_no_grad, gather_with_grad

#: Target probabilities below this are zeroed (and not renormalised), as the reference does.
TARGET_FLOOR = 1e-4


def snn(queries: Tensor, supports: Tensor, support_labels: Tensor, tau: float) -> Tensor:
    """Soft nearest-neighbour class probabilities: softmax(cos(q, s) / tau) @ Y, shape (Q, C)."""
    sims = F.normalize(queries, dim=1) @ F.normalize(supports, dim=1).T
    return torch.softmax(sims / tau, dim=1) @ support_labels


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """Row-wise p**(1/T) / sum(p**(1/T)); T < 1 lowers the entropy."""
    if temperature <= 0:
        raise ValueError(f"sharpen temperature must be > 0, got {temperature}")
    sharp = probs.pow(1.0 / temperature)
    return sharp / sharp.sum(dim=1, keepdim=True)


def support_label_matrix(class_ids: Tensor, smoothing: float = 0.1) -> Tensor:
    """Smoothed one-hot labels (S_local, C) over the C classes present in the *global* support batch.

    Columns follow the sorted class ids gathered from every process, so all processes build the same
    columns. on = 1 - s + s/C, off = s/C. Labels come from the real class ids rather than batch positions,
    which is equivalent to the reference's positional labels and does not depend on the sampler's order.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    present = torch.unique(gather_no_grad(class_ids))
    columns = torch.searchsorted(present, class_ids)
    num_classes = present.numel()
    labels = torch.full((class_ids.numel(), num_classes), smoothing / num_classes, device=class_ids.device)
    labels.scatter_(1, columns[:, None], 1.0 - smoothing + smoothing / num_classes)
    return labels


@torch.no_grad()
def paws_targets(
    target_views: Tensor,
    target_supports: Tensor,
    support_labels: Tensor,
    *,
    tau: float = 0.1,
    sharpen_T: float = 0.25,
    multicrop: int = 0,
) -> Tensor:
    """Sharpened, view-swapped targets for all (2+M)B anchors; rows below TARGET_FLOOR zeroed.

    `target_views` are the 2B projection outputs of [view 1, view 2] in natural order; `target_supports` and
    `support_labels` are already gathered over processes.
    """
    batch = target_views.shape[0] // 2
    probs = sharpen(snn(target_views.float(), target_supports.float(), support_labels, tau), sharpen_T)
    swapped = torch.cat([probs[batch:], probs[:batch]], dim=0)
    if multicrop > 0:
        small = 0.5 * (probs[:batch] + probs[batch:])
        swapped = torch.cat([swapped, small.repeat(multicrop, 1)], dim=0)
    return swapped.masked_fill(swapped < TARGET_FLOOR, 0.0)


@dataclass
class PAWSLossTerms:
    """Everything one loss evaluation produced: the two terms plus what the health signals need."""

    ce: Tensor
    me_max: Tensor
    targets: Tensor
    probs: Tensor
    supports: Tensor
    support_labels: Tensor


def paws_loss_terms(
    anchor_views: Tensor,
    anchor_supports: Tensor,
    support_labels: Tensor,
    target_views: Tensor,
    target_supports: Tensor,
    *,
    tau: float = 0.1,
    sharpen_T: float = 0.25,
    multicrop: int = 0,
    me_max: bool = True,
) -> PAWSLossTerms:
    """`paws_loss` keeping its intermediate tensors (see there for the arguments)."""
    if target_views.shape[0] % 2:
        raise ValueError(f"target_views must hold 2B rows (view 1 then view 2), got {target_views.shape[0]}")
    batch = target_views.shape[0] // 2
    if anchor_views.shape[0] != (2 + multicrop) * batch:
        raise ValueError(
            f"anchor_views has {anchor_views.shape[0]} rows but (2 + multicrop={multicrop}) x B={batch} "
            f"= {(2 + multicrop) * batch} were expected"
        )
    if anchor_supports.shape[0] != support_labels.shape[0]:
        raise ValueError(
            f"{anchor_supports.shape[0]} support embeddings but {support_labels.shape[0]} support label rows"
        )
    with torch.autocast(device_type=anchor_views.device.type, enabled=False):
        labels = gather_no_grad(support_labels.float())
        supports = gather_with_grad(anchor_supports.float())
        probs = snn(anchor_views.float(), supports, labels, tau)
        targets = paws_targets(
            target_views.detach(),
            gather_no_grad(target_supports.detach()),
            labels,
            tau=tau,
            sharpen_T=sharpen_T,
            multicrop=multicrop,
        )
        # xlogy gives 0 * log(0) = 0 and the exact gradient; log(p ** -t) of the reference can overflow.
        ce = -torch.xlogy(targets, probs).sum(dim=1).mean()
        if me_max:
            mean_probs = all_reduce_mean(sharpen(probs, sharpen_T).mean(dim=0))
            me_max_term = torch.sum(mean_probs * torch.log(mean_probs))
        else:
            me_max_term = torch.zeros((), device=probs.device)
    return PAWSLossTerms(ce, me_max_term, targets, probs, supports, labels)


def paws_loss(
    anchor_views: Tensor,
    anchor_supports: Tensor,
    support_labels: Tensor,
    target_views: Tensor,
    target_supports: Tensor,
    *,
    tau: float = 0.1,
    sharpen_T: float = 0.25,
    multicrop: int = 0,
    me_max: bool = True,
) -> tuple[Tensor, Tensor]:
    """The PAWS loss; the total to minimise is `ce + me_max_term`.

    Args:
        anchor_views: prediction outputs z of [view 1, view 2, small views...], shape ((2+M)B, D).
        anchor_supports: prediction outputs z of this process's supports (S, D); gathered with gradient.
        support_labels: (S, C) one-hot or smoothed labels of this process's supports.
        target_views: projection outputs h of [view 1, view 2] in natural order (2B, D); detached and swapped here.
        target_supports: projection outputs h of this process's supports (S, D); detached here.
        tau: soft nearest-neighbour temperature.
        sharpen_T: target sharpening temperature.
        multicrop: M, the number of small views per image.
        me_max: add the mean-entropy maximisation term sum(pbar * log pbar), pbar averaged over all processes.

    Returns:
        (ce, me_max_term): scalar float32 tensors; me_max_term is 0 when disabled. me_max_term + log(C) is
        KL(pbar || uniform) >= 0, a convenient way to display it.
    """
    terms = paws_loss_terms(
        anchor_views,
        anchor_supports,
        support_labels,
        target_views,
        target_supports,
        tau=tau,
        sharpen_T=sharpen_T,
        multicrop=multicrop,
        me_max=me_max,
    )
    return terms.ce, terms.me_max


@torch.no_grad()
def paws_health(terms: PAWSLossTerms, tau: float, multicrop: int = 0) -> dict[str, Tensor]:
    """The paper's Figure 3 signals for one step, for reporting only (no gradient).

    - target_confidence: mean over the large-view targets of their largest class probability; it rises as
      training goes well and stays near 1/C when representations collapse.
    - support_accuracy: leave-one-out soft-NN accuracy of the supports against the other supports.

    Both are 0-d tensors on the loss's device: reading them (``.item()``) is left to the logging steps, so that
    a training step never waits for the accelerator.
    """
    batch = terms.targets.shape[0] // (2 + multicrop)
    confidence = terms.targets[: 2 * batch].max(dim=1).values.mean()
    supports = F.normalize(terms.supports.detach(), dim=1)
    sims = (supports @ supports.T) / tau
    sims.fill_diagonal_(float("-inf"))
    predicted = (torch.softmax(sims, dim=1) @ terms.support_labels).argmax(dim=1)
    accuracy = (predicted == terms.support_labels.argmax(dim=1)).float().mean()
    return {"target_confidence": confidence, "support_accuracy": accuracy}
