"""SemPPL (Bošnjak et al., ICLR 2023): a contrastive method with an EMA target network whose extra positives
share a k-NN pseudo-label taken from a queue of labelled target embeddings. SEMPPL-SPEC.md sections 4-8.

Per step (spec section 8): the online network embeds all views; the target embeds the large views (no
gradient) and is gathered over processes; unlabelled anchors get a pseudo-label by a view x queue k-NN vote,
labelled anchors keep theirs; negatives are drawn once per step; semantic positives are sampled from the queue by
(pseudo-)label; the loss of ``paws_cli.losses.semppl`` follows. After the optimiser step the target moves by EMA
and the labelled images' target embeddings enter the queues (``after_step``), which checkpoints carry.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from paws_cli.collectives import gather_no_grad, gather_with_grad, rank
from paws_cli.config.schema import Section, Settings
from paws_cli.data.augment.views import ViewSpec, view_specs
from paws_cli.data.needs import DataNeeds, SupportShape
from paws_cli.data.sampling.batch import Batch
from paws_cli.losses.semppl import semppl_loss
from paws_cli.method_registry import register_method
from paws_cli.methods.base import Method
from paws_cli.modules.ema import cosine_momentum, update_momentum
from paws_cli.modules.label_queue import LabelQueue
from paws_cli.modules.pseudo_labels import knn_pseudo_labels, sample_semantic_positives


class LabelledSubBatch(Section):
    """A class-stratified labelled sub-batch that joins every batch (spec 3.2's option; per process)."""

    classes_per_batch: int = Field(
        0, ge=0, description="Classes per process; 0 keeps the natural labelled rate."
    )
    images_per_class: int = Field(1, ge=1, description="Images per class.")


class SemPPLSettings(Section):
    """SemPPL's loss, queue, k-NN and target network. Tags: [3P] third-party transcription, [INFERRED], [EXT]."""

    num_large: int = Field(
        4, ge=1, description="L, large views per image (spec 4, [3P]); augment.num_small gives S."
    )
    tau: float = Field(
        0.1, gt=0, description="Temperature of the contrastive logits (unknown; spec 9 start 0.1)."
    )
    c: float = Field(0.3, ge=0, description="Weight of the contrastive part (spec 7.5, [3P]).")
    alpha: float = Field(0.2, ge=0, description="Weight of the semantic-positive term (spec 7.5, [3P]).")
    lam: float = Field(5.0, ge=0, description="Weight of the invariance penalties (spec 7.5, [3P]).")
    num_negatives: int = Field(10, ge=1, description="n_e, negatives per anchor drawn once per step ([3P]).")
    num_positives: int = Field(
        3, ge=0, description="N_sp, semantic positives per anchor and target view ([3P])."
    )
    queue_size: int = Field(
        32768, ge=1, description="N_q, slots per queue (one queue per large view; INFERRED)."
    )
    knn_k: int = Field(1, ge=1, description="k of each view x queue k-NN vote ([3P]: 1).")
    knn_weighted: bool = Field(
        False, description="Weight the k votes by similarity instead of counting them."
    )
    knn_query: Literal["online_pred", "target_proj"] = Field(
        "online_pred",
        description="k-NN query: the online prediction ([3P]) or the target projection (spec 6.2).",
    )
    softmax_over: Literal["targets", "onlines"] = Field(
        "targets",
        description="Orientation (spec 7.1): online anchor over target candidates, or the reverse ([3P]).",
    )
    inv_mode: Literal["swap", "rowcol", "off"] = Field(
        "swap",
        description="Invariance penalty (spec 7.4): swapped-pair KL, row/column KL in one pair, or none.",
    )
    ema_base: float = Field(
        0.99, ge=0, le=1, description="Target EMA momentum at step 0; cosine to 1 at the end (spec 5.3)."
    )
    use_predictor: bool = Field(True, description="Online predictor head (spec 5.2; model.pred_hidden_dim).")
    byol_presets: bool = Field(
        True,
        description="BYOL's asymmetric views (spec 4): large views 1, 3 blur p=1 no solarize; large 2, 4 and "
        "small views blur p=0.1, solarize p=0.2. False: every view uses augment.blur_p/solarize_p.",
    )
    pseudo_labels: Literal["knn", "oracle"] = Field(
        "knn",
        description="'knn' (the method); 'oracle' uses the hidden true labels of all images: a diagnostic upper "
        "bound only, never a result.",
    )
    labelled_batch: LabelledSubBatch = Field(
        default_factory=lambda: LabelledSubBatch(),
        description="A class-stratified labelled sub-batch joining every batch (spec 3.2's option).",
    )

    @model_validator(mode="after")
    def _enough_candidates(self) -> SemPPLSettings:
        if self.pseudo_labels == "oracle" and self.num_positives == 0:
            raise ValueError("semppl.pseudo_labels=oracle needs semppl.num_positives >= 1")
        return self


class SemPPLModel(nn.Module):
    """The online encoder (backbone, projector, predictor) and its EMA target (backbone, projector).

    ``forward`` runs the online network (the part DDP synchronises); ``target`` is used without gradient.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        target = copy.deepcopy(encoder)
        target.prediction = None  # there is no target predictor (spec 2)
        for p in target.parameters():
            p.requires_grad_(False)
        self.target = target

    def forward(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.encoder(views)


def semppl_views(settings: Settings) -> tuple[ViewSpec, ...]:
    """The view specs in batch order: L large then S small, with BYOL's asymmetric presets when asked."""
    cfg: SemPPLSettings = settings.section("semppl")
    large, small = view_specs(settings.augment)
    larges = [large] * cfg.num_large
    smalls = [small] * settings.augment.num_small if small is not None else []
    if cfg.byol_presets:  # BYOL view 1: always blurred, never solarised; view 2: rarely blurred, solarised
        one, two = replace(large, blur_p=1.0, solarize_p=0.0), replace(large, blur_p=0.1, solarize_p=0.2)
        # Half of the large views of each kind (spec 4's views 1, 3 and 2, 4), grouped so that each kind is drawn
        # as one batch; the loss sums over all view pairs, so the order of the views does not matter.
        larges = [one] * ((cfg.num_large + 1) // 2) + [two] * (cfg.num_large // 2)
        smalls = [replace(s, blur_p=0.1, solarize_p=0.2) for s in smalls]
    return tuple(larges + smalls)


@register_method("semppl")
class SemPPLMethod(Method):
    settings_class = SemPPLSettings
    title = "SemPPL"

    def __init__(self, settings: Settings, *, in_chans: int, num_classes: int) -> None:
        super().__init__(settings, in_chans=in_chans, num_classes=num_classes)
        cfg: SemPPLSettings = self.cfg
        self.queue = LabelQueue(cfg.num_large, cfg.queue_size, settings.model.proj_out_dim)
        self.calls = 0  # loss calls so far: seeds this step's negatives and positive draws
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def data_needs(cls, settings: Settings) -> DataNeeds:
        cfg: SemPPLSettings = settings.section(cls.name)
        sub, shape = None, cfg.labelled_batch
        if shape.classes_per_batch:
            sub = SupportShape(
                shape.classes_per_batch, shape.images_per_class, True, f"{cls.name}.labelled_batch"
            )
        return DataNeeds(
            unlabelled_views=True, views=semppl_views(settings), labels_in_batch=True, labelled_sub_batch=sub
        )

    @classmethod
    def target_views(cls, settings: Settings) -> int:
        return int(settings.section(cls.name).num_large)  # the EMA target embeds the L large views (spec 4)

    def build_model(self) -> nn.Module:
        return SemPPLModel(self.build_encoder(prediction=self.cfg.use_predictor))

    def _generator(self, device: torch.device) -> torch.Generator:
        """This step's generator, the same on every process: draws are made for the whole global batch and each
        process keeps its own rows, so a run's draws do not depend on how many processes share the batch."""
        words = np.random.SeedSequence([self.settings.run.seed, self.calls, 0x5E991]).generate_state(2)
        generator = torch.Generator(device=device)
        generator.manual_seed(((int(words[0]) << 32) | int(words[1])) & (2**63 - 1))
        return generator

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg: SemPPLSettings = self.cfg
        L, views = cfg.num_large, batch.views
        B = views[0].shape[0]
        device = views[0].device
        self.queue = self.queue.to(device) if self.queue.device != device else self.queue
        generator = self._generator(device)
        self.calls += 1
        _, z = model(views)
        online = z.float().view(len(views), B, -1)
        with torch.no_grad():
            target_net = getattr(model, "module", model).target
            h_t, _ = target_net(views[:L])
            targets = gather_no_grad(h_t.float().view(L, B, -1).transpose(0, 1)).transpose(0, 1)
            labels_all, ids_all = gather_no_grad(batch.labels), gather_no_grad(batch.ids)
        B_all = targets.shape[1]
        anchor_index = rank() * B + torch.arange(B, device=device)
        health, y_tilde = self._pseudo_labels(online, targets, anchor_index, batch)
        y_tilde_all = gather_no_grad(y_tilde)
        negatives = _draw_negatives(B_all, cfg.num_negatives, generator, device)[anchor_index]
        sem_pos, sem_valid = sample_semantic_positives(
            self.queue, y_tilde_all, ids_all, cfg.num_positives, generator, exclude_self=True
        )
        sem_valid_all = sem_valid
        sem_pos, sem_valid = sem_pos[:, :, anchor_index], sem_valid[:, :, anchor_index]
        candidates = (
            gather_with_grad(online.transpose(0, 1)).transpose(0, 1) if self._needs_all_online() else online
        )
        terms = semppl_loss(
            candidates, targets, negatives, sem_pos, sem_valid, tau=cfg.tau, c=cfg.c, alpha=cfg.alpha,
            lam=cfg.lam, anchor_index=anchor_index,
            inv_mode=cfg.inv_mode, softmax_over=cfg.softmax_over, sem_valid_all=sem_valid_all,
        )  # fmt: skip
        labelled = labels_all >= 0
        self._pending = (targets[:, labelled], labels_all[labelled], ids_all[labelled])
        metrics = {
            "loss": terms.total.detach(),
            "augm": terms.augm.detach(),
            "sempos": terms.sempos.detach(),
            "inv_augm": terms.inv_augm.detach(),
            "inv_sempos": terms.inv_sempos.detach(),
            "valid_positives": sem_valid.float().mean(),
            **health,
        }
        return terms.total, metrics

    def _needs_all_online(self) -> bool:
        """The [3P] orientation and the row/column penalty use other anchors' online vectors as candidates."""
        return self.cfg.softmax_over == "onlines" or self.cfg.inv_mode == "rowcol"

    @torch.no_grad()
    def _pseudo_labels(
        self, online: Tensor, targets: Tensor, anchor_index: Tensor, batch: Batch
    ) -> tuple[dict[str, Tensor], Tensor]:
        """(health signals, the label each anchor's positives share): true labels for labelled anchors, the
        view x queue k-NN vote (spec 6.2) for the others."""
        cfg: SemPPLSettings = self.cfg
        L = cfg.num_large
        queries = online[:L] if cfg.knn_query == "online_pred" else targets[:, anchor_index]
        votes = knn_pseudo_labels(
            queries.detach(), self.queue, batch.ids, k=cfg.knn_k, weighted=cfg.knn_weighted
        )
        labelled = batch.labels >= 0
        if cfg.pseudo_labels == "oracle":
            y_tilde = batch.true_labels
        else:
            y_tilde = torch.where(labelled, batch.labels, votes.labels)
        hidden = ~labelled & votes.has_vote
        correct = (votes.labels == batch.true_labels) & hidden
        health = {
            # over the unlabelled anchors that got a vote (their labels are hidden from training)
            "pseudo_label_accuracy": correct.float().sum() / hidden.float().sum().clamp_min(1),
            "pseudo_labelled_share": hidden.float().sum() / (~labelled).float().sum().clamp_min(1),
            "vote_agreement": (votes.agreement * votes.has_vote).sum()
            / votes.has_vote.float().sum().clamp_min(1),
            "queue_classes": torch.tensor(float(self.queue.classes_present().numel()), device=online.device),
            "labelled_in_batch": labelled.float().sum(),
        }
        return health, y_tilde

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """EMA of the target (spec 5.3), then the labelled images of this step enter the queues (spec 6.1: after
        the loss and the EMA step; their own ids are masked when they are anchors later)."""
        inner = getattr(model, "module", model)
        m = cosine_momentum(min(step, total_steps), total_steps, self.cfg.ema_base)
        update_momentum(inner.target.backbone, inner.encoder.backbone, m)
        update_momentum(inner.target.projection, inner.encoder.projection, m)
        if self._pending is not None:
            vectors, labels, ids = self._pending
            if labels.numel():
                self.queue.enqueue(vectors, labels, ids)
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue.state_dict(), "calls": torch.tensor(self.calls)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.queue.load_state_dict(dict(state["queue"]))
        self.calls = int(state["calls"])


def _draw_negatives(batch: int, count: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """(batch, count): for each anchor of the global batch, ``count`` distinct other images of it, uniformly
    (spec 7.1: drawn once per step, shared by every view pair and draw)."""
    if count > batch - 1:
        raise ValueError(
            f"semppl.num_negatives={count} needs a global batch of at least {count + 1} images, got {batch}; "
            "lower semppl.num_negatives or raise optim.batch_size"
        )
    keys = torch.rand(batch, batch, generator=generator, device=device)
    keys.fill_diagonal_(-1.0)  # never the anchor itself: the other keys are in [0, 1)
    return keys.topk(count, dim=1).indices
