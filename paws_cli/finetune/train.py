"""The fine-tuning loop: SGD (Nesterov) with a cosine to zero, selection on held-out data, exact resume.

Per epoch (every ``finetune.eval_every`` epochs and at the last one) the model is scored on the held-out set;
the best epoch's weights (the latest of tied epochs) go to ``best.pt`` (the weights that were scored, not the
next epoch's) and, at the end, those weights are scored once on the test set. ``checkpoint.pt`` (model, optimiser, step, history,
settings) is written at every epoch end and when ``run.max_steps`` stops a run, so ``--resume`` continues it
exactly: batches and views are functions of the step alone.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from paws_cli.checkpoints import FINETUNE_KIND, PretrainedWeights
from paws_cli.config import Settings
from paws_cli.config.schema import OptimSettings
from paws_cli.data.eval_data import build_eval_data
from paws_cli.data.splits import write_split
from paws_cli.finetune.data import FinetuneData, make_finetune_splits
from paws_cli.finetune.model import FinetuneModel, build_finetune_model
from paws_cli.finetune.results import FinetuneResult
from paws_cli.io_utils import atomic_write_text
from paws_cli.optim import StepSchedule, split_decay_params
from paws_cli.train.checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from paws_cli.train.distributed_setup import barrier, init_distributed, main_first, wrap_model
from paws_cli.train.loop import autocast_for, backward_and_step, make_grad_scaler
from paws_cli.train.progress import TrainProgress
from paws_cli.train.rundir import (
    CHECKPOINT,
    JsonlWriter,
    prepare_run_dir,
    release_run_dir,
    run_dir_of,
    write_resolved_config,
)

BEST = "best.pt"
RESULTS = "finetune.json"
#: Settings that may differ on resume.
RESUMABLE_CHANGES = ("run.", "eval.")


@dataclass
class _Progress:
    """What a checkpoint restores besides weights: the step, the epoch's running sums and the selection."""

    step: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "correct": 0.0, "images": 0.0})
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None


def create_finetune_optimizer(model: torch.nn.Module, settings: Settings) -> torch.optim.Optimizer:
    """SGD over the trainable parameters; weight decay (0 in the protocol) skips biases and norm layers."""
    ft = settings.finetune
    decayed, excluded = split_decay_params(model)  # only parameters that require a gradient
    groups = [{"params": decayed, "weight_decay": ft.weight_decay}, {"params": excluded, "weight_decay": 0.0}]
    return torch.optim.SGD(
        [g for g in groups if g["params"]], lr=ft.lr, momentum=ft.momentum, nesterov=ft.nesterov
    )


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


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _resume(
    path: Path,
    settings: Settings,
    model: FinetuneModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    train_ids: np.ndarray,
    heldout_ids: np.ndarray,
) -> _Progress:
    state = load_checkpoint(path)
    if state.get("kind") != FINETUNE_KIND:
        raise CheckpointError(f"cannot resume from {path}: it is not a fine-tuning checkpoint")
    saved = _flat(Settings.model_validate(state["settings"]).model_dump(mode="json"))
    now = _flat(settings.model_dump(mode="json"))
    changed = [k for k in now if not k.startswith(RESUMABLE_CHANGES) and saved.get(k) != now[k]]
    if changed:
        raise CheckpointError(
            f"cannot resume from {path}: these settings differ from the checkpoint's: {', '.join(changed)}. "
            "Resume with the same recipe and overrides (or the run's resolved_config.yaml as --recipe)."
        )
    for name, ids in (("train_indices", train_ids), ("heldout_indices", heldout_ids)):
        if not torch.equal(state[name], torch.as_tensor(ids)):
            raise CheckpointError(
                f"cannot resume from {path}: its {name.split('_')[0]} images differ from now"
            )
    load_state_strict(model, state["model"], str(path))
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    return _Progress(int(state["step"]), dict(state["sums"]), list(state["history"]), state["best"])


def run_finetune(
    settings: Settings,
    weights: PretrainedWeights,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    default_name: str = "finetune",
) -> FinetuneResult:
    """Fine-tune (or linear-probe) ``weights`` on the labelled subset of ``settings.data``; see the module doc.

    The run directory stays locked against other processes until this returns or raises.
    """
    try:
        return _run_finetune(
            settings, weights, resume=resume, overwrite=overwrite, console=console, default_name=default_name
        )
    finally:
        release_run_dir(run_dir_of(settings, default_name))


def _run_finetune(
    settings: Settings,
    weights: PretrainedWeights,
    *,
    resume: bool,
    overwrite: bool,
    console: Console | None,
    default_name: str,
) -> FinetuneResult:
    console = console or Console()
    run, ft = settings.run, settings.finetune
    if run.time_budget_s is not None:
        raise ValueError(
            "run.time_budget_s applies to pretraining; fine-tuning runs finetune.epochs (unset it)"
        )
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    ctx = init_distributed(run)
    device = ctx.device
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny weights late in training otherwise slow CPU kernels down
    torch.manual_seed(run.seed)

    # --- data, model, optimiser ---
    # In-memory arrays or an ImageFolder (paws_cli.data.eval_data); rank 0 converts a dataset once.
    dataset = main_first(ctx, lambda: build_eval_data(settings))
    if dataset.in_chans != weights.architecture.in_chans:
        raise ValueError(
            f"{weights.path} expects {weights.architecture.in_chans}-channel images but {dataset.name} has "
            f"{dataset.in_chans}; fine-tune on the data it was pretrained for (check data.*)"
        )
    labelled, labelled_source = dataset.labelled(settings.data)
    splits = make_finetune_splits(settings, dataset, labelled)
    path = run_dir_of(settings, default_name)
    run_dir = main_first(
        ctx, lambda: prepare_run_dir(path, resume=resume, overwrite=overwrite, lock=True), lambda: path
    )
    model = build_finetune_model(
        weights.build_encoder(),
        dataset.num_classes,
        keep_projection_layers=ft.keep_projection_layers,
        mode=ft.mode,
    ).to(device)
    if settings.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = FinetuneData(
        settings, dataset, splits.train, device=device, world_size=ctx.world_size, rank=ctx.rank
    )
    batches = data.batches
    spe = batches.steps_per_epoch
    total = max(round(ft.epochs * spe), 1)
    optimizer = create_finetune_optimizer(model, settings)
    schedule = StepSchedule(optimizer, schedule_settings(settings), total, spe)
    wrapped = wrap_model(model, ctx, settings.model)
    scaler = make_grad_scaler(device, run.precision)
    p = (
        _resume(run_dir / CHECKPOINT, settings, model, optimizer, scaler, splits.train, splits.heldout)
        if resume
        else _Progress()
    )

    def autocast() -> Any:
        return autocast_for(device, run.precision)

    def score(ids: np.ndarray | None) -> dict[str, float]:
        return data.score(model, ids, autocast)

    def state(complete: bool) -> dict[str, Any]:
        return {
            "kind": FINETUNE_KIND,
            "settings": settings.model_dump(mode="json"),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": p.step,
            "epoch": p.step / spe,
            "epoch_complete": complete,
            "sums": dict(p.sums),
            "history": list(p.history),
            "best": p.best,
            "rng": {"torch": torch.get_rng_state()},
            "train_indices": torch.as_tensor(splits.train),
            "heldout_indices": torch.as_tensor(splits.heldout),
            "pretrained": str(weights.path),
        }

    if ctx.is_main:
        write_resolved_config(run_dir, settings)
        write_split(
            run_dir / "train.txt", splits.train.tolist(), {"dataset": dataset.name, "role": "finetune-train"}
        )
        write_split(
            run_dir / "heldout.txt", splits.heldout.tolist(), {"dataset": dataset.name, "role": "selection"}
        )
        what = "fine-tuning (whole network)" if ft.mode == "full" else "linear probe (frozen backbone)"
        console.print(f"[bold]paws finetune[/]: {what} of {weights.path} ({weights.kind}) -> {run_dir}")
        console.print(f"data: {dataset.describe()}; labelled: {labelled_source}")
        pretraining = weights.meta.get("labelled")
        if pretraining is not None and not np.array_equal(np.sort(pretraining.numpy()), np.sort(labelled)):
            console.print(
                "[yellow]note:[/] this labelled subset differs from the one the checkpoint was pretrained with"
            )
        console.print(f"selection: {splits.description}; the test set is used once, for the selected epoch")
        console.print(
            f"  {ctx.world_size} process(es), global batch {batches.global_batch}; {spe} steps per epoch x "
            f"{ft.epochs} epochs = {total}; SGD lr {ft.lr} cosine to 0, momentum {ft.momentum}"
            f"{' (Nesterov)' if ft.nesterov else ''}, weight decay {ft.weight_decay}; crop scale {ft.crop_scale}"
        )

    # --- training ---
    step_log = JsonlWriter(run_dir / "metrics.jsonl") if ctx.is_main else None
    epoch_log = JsonlWriter(run_dir / "epochs.jsonl") if ctx.is_main else None
    last_stop = min(total, p.step + run.max_steps) if run.max_steps else total
    bar = TrainProgress(console, total=last_stop, start=p.step, enabled=ctx.is_main and run.progress)
    started = time.perf_counter()
    with bar:
        while p.step < last_stop:
            wrapped.train()
            x, y = batches.batch(p.step)
            lr = schedule.set(p.step)
            with autocast():
                logits = wrapped(x)
            loss = F.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the fine-tuning loss is {loss.item()} at step {p.step} (lr {lr:.4g}); lower finetune.lr"
                )
            backward_and_step(loss, optimizer, scaler)
            p.step += 1
            p.sums["loss"] += loss.item() * len(y)
            p.sums["correct"] += (logits.argmax(dim=1) == y).sum().item()
            p.sums["images"] += len(y)
            if step_log and (p.step % run.log_every == 0 or p.step == last_stop):
                record = {"step": p.step, "lr": lr, "loss": round(loss.item(), 6)}
                step_log.write(record)
                bar.update(
                    p.step,
                    record,
                    lr,
                    batches.global_batch * (p.step) / max(time.perf_counter() - started, 1e-9),
                )
            epoch_done = p.step % spe == 0 or p.step == total
            if epoch_done:
                epoch = math.ceil(p.step / spe)
                record = {
                    "epoch": epoch,
                    "step": p.step,
                    "lr": lr,
                    "loss": p.sums["loss"] / max(p.sums["images"], 1),
                    "train_accuracy": 100.0 * p.sums["correct"] / max(p.sums["images"], 1),
                }
                p.sums = _Progress().sums
                if epoch % ft.eval_every == 0 or p.step == total:
                    held = score(splits.heldout)
                    record.update(heldout_top1=held["top1"], heldout_top5=held["top5"])
                    # a tie goes to the later epoch (further along the schedule; small held-out sets tie often)
                    if p.best is None or held["top1"] >= p.best["heldout_top1"]:
                        p.best = {
                            "epoch": epoch,
                            "step": p.step,
                            "heldout_top1": held["top1"],
                            "heldout_top5": held["top5"],
                        }
                        if ctx.is_main:
                            save_checkpoint(
                                run_dir / BEST, {**state(True), "optimizer": None, "selection": p.best}
                            )
                p.history.append(record)
                if epoch_log:
                    epoch_log.write(record)
                    bar.epoch_summary(epoch, {k: v for k, v in record.items() if k not in ("epoch", "step")})
            if ctx.is_main and (epoch_done or p.step == last_stop):
                save_checkpoint(run_dir / CHECKPOINT, state(epoch_done))
    train_seconds = time.perf_counter() - started
    for writer in (step_log, epoch_log):
        if writer:
            writer.close()

    # --- the selected epoch on the test set ---
    result = FinetuneResult(
        pretrained=str(weights.path),
        pretrained_kind=weights.kind,
        mode=ft.mode,
        dataset=dataset.name,
        run_dir=str(run_dir),
        checkpoint=str(run_dir / CHECKPOINT),
        best_checkpoint=str(run_dir / BEST),
        train_images=len(splits.train),
        heldout_images=len(splits.heldout),
        heldout_source=splits.description,
        test_images=len(dataset.query_labels),
        epochs=ft.epochs,
        steps=p.step,
        complete=p.step == total,
        train_seconds=train_seconds,
        history=p.history,
    )
    if result.complete and p.best is not None:
        barrier()
        load_state_strict(model, load_checkpoint(run_dir / BEST)["model"], str(run_dir / BEST))
        test = score(None)
        result.selected_epoch = int(p.best["epoch"])
        result.heldout_top1, result.heldout_top5 = p.best["heldout_top1"], p.best["heldout_top5"]
        result.test_top1, result.test_top5 = test["top1"], test["top5"]
    if ctx.is_main:
        atomic_write_text(run_dir / RESULTS, json.dumps(result.as_dict(), indent=2) + "\n")
    return result
