"""Setting a fine-tuning run up: process group, data and splits, run directory, model, optimiser, schedule, then
resume or a fresh start. ``set_up`` returns a :class:`FinetuneRun`, everything the loop reads and updates."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from paws_cli.config import Settings
from paws_cli.config.paths import with_absolute_paths
from paws_cli.config.schema import OptimSettings
from paws_cli.config.trees import flatten_keys, lookup, upgrade_saved_tree
from paws_cli.data.backends.eval_data import EvalData, build_eval_data
from paws_cli.data.splits.files import write_split
from paws_cli.finetune.data import FinetuneBatches, FinetuneData, FinetuneSplits, make_finetune_splits
from paws_cli.finetune.model import FinetuneModel, build_finetune_model
from paws_cli.finetune.progress import finetune_epoch_text, pretrained_text
from paws_cli.optim import StepSchedule, split_decay_params
from paws_cli.pretrained import FINETUNE_KIND, PretrainedWeights
from paws_cli.train.checkpoint_io import CheckpointError, load_checkpoint, load_state_strict
from paws_cli.train.guards import StopSignals
from paws_cli.train.process_group import DistContext, init_distributed, main_first, wrap_model
from paws_cli.train.progress import TrainProgress
from paws_cli.train.rundir import (
    CHECKPOINT,
    JsonlWriter,
    prepare_run_dir,
    run_dir_of,
    trim_logs,
    write_resolved_config,
)
from paws_cli.train.step import autocast_for, make_grad_scaler
from paws_cli.train.tensorboard_log import check_tensorboard, open_metric_logs

#: Settings that may differ on resume; stricter than pretraining's (``train.run_state``): a fine-tuning run's
#: ``finetune.*`` settings are what it trains, and ``slurm.*`` does not apply to it.
RESUMABLE_CHANGES = ("run.", "eval.", "data.num_workers")


def _zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "images": 0.0}


@dataclass
class FinetuneRun:
    """One process's fine-tuning run: what was built, and the counters the loop advances (a checkpoint restores
    the step, the epoch's running sums, the history and the selection)."""

    settings: Settings
    console: Console
    ctx: DistContext
    weights: PretrainedWeights
    dataset: EvalData
    labelled: np.ndarray
    labelled_source: str
    splits: FinetuneSplits
    run_dir: Path
    model: FinetuneModel
    wrapped: torch.nn.Module  # the model as trained (DDP on several processes)
    data: FinetuneData
    optimizer: torch.optim.Optimizer
    schedule: StepSchedule
    scaler: torch.amp.GradScaler | None
    total_steps: int
    step: int = 0
    sums: dict[str, float] = field(default_factory=_zero_sums)
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    complete: bool = False  # resumed from a checkpoint of a finished run: nothing to train
    interrupted: bool = False  # SIGINT/SIGTERM stopped this session
    last_stop: int = 0  # the step this session stops after (the schedule's end, or run.max_steps more)
    first_step: int = 0  # this session's first step
    started: float = field(default_factory=time.perf_counter)
    train_seconds_before: float = 0.0  # earlier sessions of a resumed run
    session_seconds: float | None = None  # set when this session's training ends
    signals: StopSignals = field(default_factory=StopSignals)
    progress: TrainProgress = field(init=False)
    step_log: JsonlWriter | None = None
    epoch_log: JsonlWriter | None = None

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def batches(self) -> FinetuneBatches:
        return self.data.batches

    @property
    def steps_per_epoch(self) -> int:
        return self.data.batches.steps_per_epoch

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast_for(self.device, self.settings.run.precision)

    def score(self, ids: np.ndarray | None) -> dict[str, float]:
        """Top-1/top-5 on the train images ``ids`` (held-out selection) or, with None, the test set."""
        return self.data.score(self.model, ids, self.autocast)

    def train_seconds(self) -> float:
        """Seconds spent training, all sessions of the run together."""
        session = time.perf_counter() - self.started if self.session_seconds is None else self.session_seconds
        return self.train_seconds_before + (0.0 if self.complete else session)

    def close_logs(self) -> None:
        self.session_seconds = time.perf_counter() - self.started
        for writer in (self.step_log, self.epoch_log):
            if writer:
                writer.close()


def create_finetune_optimizer(model: FinetuneModel, settings: Settings) -> torch.optim.Optimizer:
    """SGD over the trainable parameters; weight decay (0 in the protocol) skips biases and norm layers.

    With finetune.backbone_lr_scale != 1 the pretrained layers' groups carry ``lr_scale`` (read by
    ``FinetuneSchedule``) and the classifier's groups come first; with 1, the two groups of SimCLRv2's protocol.
    """
    ft = settings.finetune
    parts: list[tuple[torch.nn.Module, float]] = [(model, 1.0)]
    if ft.backbone_lr_scale != 1.0:
        parts = [
            (model.classifier, 1.0),
            (torch.nn.ModuleList([model.backbone, model.head]), ft.backbone_lr_scale),
        ]
    groups = []
    for module, scale in parts:
        decayed, excluded = split_decay_params(module)  # only parameters that require a gradient
        extra = {"lr_scale": scale} if scale != 1.0 else {}
        groups += [
            {"params": decayed, "weight_decay": ft.weight_decay, **extra},
            {"params": excluded, "weight_decay": 0.0, **extra},
        ]
    return torch.optim.SGD(
        [g for g in groups if g["params"]], lr=ft.lr, momentum=ft.momentum, nesterov=ft.nesterov
    )


class FinetuneSchedule(StepSchedule):
    """The shared schedule, each group's lr then multiplied by its ``lr_scale`` (finetune.backbone_lr_scale)."""

    def set(self, step: int) -> float:
        """Set every group's lr for ``step`` and return the schedule's (the classifier's) lr."""
        lr = super().set(step)  # every group at the unscaled value (the groups share one peak lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


def schedule_settings(settings: Settings) -> OptimSettings:
    """The fine-tuning schedule in the shared schedule's terms: no warm-up, cosine from lr to 0."""
    ft = settings.finetune
    return OptimSettings(
        optimizer="sgd",
        epochs=ft.epochs,
        lr=ft.lr,
        start_lr=ft.lr,
        final_lr=0.0,
        warmup_epochs=0,
        weight_decay=ft.weight_decay,
        momentum=ft.momentum,
        nesterov=ft.nesterov,
    )


def set_up(
    settings: Settings,
    weights: PretrainedWeights,
    *,
    resume: bool,
    overwrite: bool,
    console: Console,
    name: str,
) -> FinetuneRun:
    """Everything before the first step, in this order (the order fixes the initial weights)."""
    settings = with_absolute_paths(settings)  # what the run records works from any directory
    if settings.run.time_budget_s is not None:
        raise ValueError(
            "run.time_budget_s applies to pretraining; fine-tuning runs finetune.epochs (unset it)"
        )
    check_tensorboard(settings.run.tensorboard)  # before any work: a missing extra fails at once
    if settings.run.num_threads:
        torch.set_num_threads(settings.run.num_threads)
    ctx = init_distributed(settings.run)
    if ctx.device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny weights late in training otherwise slow CPU kernels down
    torch.manual_seed(settings.run.seed)
    # In-memory arrays or an ImageFolder (paws_cli.data.backends.eval_data); rank 0 converts a dataset once.
    dataset = main_first(ctx, lambda: build_eval_data(settings))
    if dataset.in_chans != weights.architecture.in_chans:
        raise ValueError(
            f"{weights.path} expects {weights.architecture.in_chans}-channel images but {dataset.name} has "
            f"{dataset.in_chans}; fine-tune on the data it was pretrained for (check data.*)"
        )
    labelled, labelled_source = dataset.labelled(settings.data)
    splits = make_finetune_splits(settings, dataset, labelled)
    path = run_dir_of(settings, name)
    run_dir = main_first(
        ctx, lambda: prepare_run_dir(path, resume=resume, overwrite=overwrite, lock=True), lambda: path
    )
    run = _build(settings, weights, ctx, dataset, labelled, labelled_source, splits, run_dir, console)
    if resume:
        _resume(run)
    max_steps = settings.run.max_steps  # more steps in this session
    run.first_step = run.step
    run.last_stop = min(run.total_steps, run.step + max_steps) if max_steps else run.total_steps
    run.progress = TrainProgress(
        console,
        total=run.last_stop,
        start=run.step,
        enabled=run.is_main and settings.run.progress and not run.complete,
        label="finetune",
        epoch_text=finetune_epoch_text(settings.finetune.epochs),
    )
    if not run.complete:
        _start_logs(run, resumed=resume)
    return run


def _build(
    settings: Settings,
    weights: PretrainedWeights,
    ctx: DistContext,
    dataset: EvalData,
    labelled: np.ndarray,
    labelled_source: str,
    splits: FinetuneSplits,
    run_dir: Path,
    console: Console,
) -> FinetuneRun:
    """Model (on the device), training data, optimiser, schedule, the wrapped model and the loss scaler."""
    ft = settings.finetune
    model = build_finetune_model(
        weights.build_encoder(),
        dataset.num_classes,
        keep_projection_layers=ft.keep_projection_layers,
        mode=ft.mode,
        normalize=ft.normalize_features,
        keep_prediction_head=ft.keep_prediction_head,
    ).to(ctx.device)
    if settings.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = FinetuneData(
        settings, dataset, splits.train, device=ctx.device, world_size=ctx.world_size, rank=ctx.rank
    )
    if ft.classifier_init == "prototypes":  # a resumed run's checkpoint then replaces these weights
        autocast = partial(autocast_for, ctx.device, settings.run.precision)
        model.init_from_prototypes(*data.features(model, splits.train, autocast), ft.prototype_tau)
    spe = data.batches.steps_per_epoch
    total = max(round(ft.epochs * spe), 1)
    optimizer = create_finetune_optimizer(model, settings)
    schedule = FinetuneSchedule(optimizer, schedule_settings(settings), total, spe)
    wrapped = wrap_model(model, ctx, settings.model)
    scaler = make_grad_scaler(ctx.device, settings.run.precision)
    return FinetuneRun(
        settings,
        console,
        ctx,
        weights,
        dataset,
        labelled,
        labelled_source,
        splits,
        run_dir,
        model,
        wrapped,
        data,
        optimizer,
        schedule,
        scaler,
        total,
    )


def _resume(run: FinetuneRun) -> None:
    """Restore the checkpoint into ``run``; a finished run is marked complete."""
    path = run.checkpoint_path
    state = load_checkpoint(path)
    if state.get("kind") != FINETUNE_KIND:
        raise CheckpointError(f"cannot resume from {path}: it is not a fine-tuning checkpoint")
    check_same_finetune_settings(path, state["settings"], run.settings)
    for name, ids in (("train_indices", run.splits.train), ("heldout_indices", run.splits.heldout)):
        if not torch.equal(state[name], torch.as_tensor(ids)):
            raise CheckpointError(
                f"cannot resume from {path}: its {name.split('_')[0]} images differ from now"
            )
    load_state_strict(run.model, state["model"], str(path))
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    run.step, run.sums = int(state["step"]), dict(state["sums"])
    run.history, run.best = list(state["history"]), state["best"]
    run.train_seconds_before = float(state.get("train_seconds", 0.0))
    run.complete = run.step >= run.total_steps
    if run.is_main and not run.complete:
        run.console.print(f"resuming {run.run_dir} from {path}: step {run.step} of {run.total_steps}")


def check_same_finetune_settings(path: Path, saved_tree: dict[str, Any], settings: Settings) -> None:
    """A resume must train what the checkpoint trained: only ``run.*`` and ``eval.*`` settings may differ.

    (``train.run_state.check_same_settings`` lets ``finetune.*`` differ, as it should for pretraining.)
    """
    saved = Settings.model_validate(upgrade_saved_tree(saved_tree)).model_dump(mode="json")
    now = settings.model_dump(mode="json")
    keys = dict.fromkeys(flatten_keys(now) + flatten_keys(saved))
    changed = [k for k in keys if not k.startswith(RESUMABLE_CHANGES) and lookup(saved, k) != lookup(now, k)]
    if changed:
        raise CheckpointError(
            f"cannot resume from {path}: these settings differ from the checkpoint's: {', '.join(changed)}. "
            "Resume with the same recipe and overrides (or the run's resolved_config.yaml as --recipe)."
        )


def _start_logs(run: FinetuneRun, *, resumed: bool) -> None:
    """Rank 0: trim logs of steps to be trained again, write the resolved settings and the splits, print the
    run's banner, and open the JSONL logs."""
    if not run.is_main:
        return
    if resumed:
        trim_logs(run.run_dir, run.step)  # steps a killed run logged after its checkpoint are trained again
    write_resolved_config(run.run_dir, run.settings)
    name, splits = run.dataset.name, run.splits
    write_split(run.run_dir / "train.txt", splits.train.tolist(), {"dataset": name, "role": "finetune-train"})
    if len(splits.heldout):  # finetune.val_per_class=0 holds none out
        write_split(
            run.run_dir / "heldout.txt", splits.heldout.tolist(), {"dataset": name, "role": "selection"}
        )
    for line in _banner(run):
        run.console.print(line)
    run.step_log, run.epoch_log = open_metric_logs(
        run.run_dir, tensorboard=run.settings.run.tensorboard, resumed_at=run.step if resumed else None
    )


def _banner(run: FinetuneRun) -> list[str]:
    ft, weights, batches = run.settings.finetune, run.weights, run.batches
    what = "Fine-tuning (whole network)" if ft.mode == "full" else "Linear probe (frozen backbone)"
    lines = [
        f"[bold]{what}[/] of {escape(str(weights.path))} ({pretrained_text(weights)}) -> "
        f"{escape(str(run.run_dir))}",
        f"data: {run.dataset.describe()}; labelled: {run.labelled_source}",
    ]
    pretraining = weights.meta.get("labelled")
    if pretraining is not None and not np.array_equal(np.sort(pretraining.numpy()), np.sort(run.labelled)):
        lines.append(
            "[yellow]note:[/] this labelled subset differs from the one the checkpoint was pretrained with"
        )
    lines.append(
        f"selection ({SELECT_TEXT[ft.select]}): {run.splits.description}; the test set is used once, for the "
        "selected epoch"
    )
    lines.append(
        f"  {run.ctx.world_size} process(es), global batch {batches.global_batch}; {run.steps_per_epoch} steps "
        f"per epoch x {ft.epochs} epochs = {run.total_steps}; SGD lr {ft.lr} cosine to 0, momentum "
        f"{ft.momentum}{' (Nesterov)' if ft.nesterov else ''}, weight decay {ft.weight_decay}; crop scale "
        f"{ft.crop_scale}"
    )
    if (
        ft.backbone_lr_scale != 1.0
        or ft.classifier_init != "zero"
        or ft.normalize_features
        or ft.label_smoothing
    ):
        lines.append(
            f"  classifier on {run.model.classifier.in_features}-d "
            f"{'unit ' if ft.normalize_features else ''}features, initialised "
            + (
                f"from the class prototypes (tau {ft.prototype_tau})"
                if ft.classifier_init == "prototypes"
                else "to 0"
            )
            + f"; pretrained layers at {ft.backbone_lr_scale:g} x lr; label smoothing {ft.label_smoothing:g}"
        )
    return lines


#: How finetune.select picks the tested epoch, for the banner.
SELECT_TEXT = {
    "accuracy": "best held-out top-1",
    "loss": "lowest held-out loss",
    "last": "the last epoch",
}
