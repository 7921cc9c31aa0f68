"""The training loop shared by every method, read top to bottom: ``train`` sets the run up (``set_up``), then
``train_one_epoch`` runs the steps; non-finite losses, the time budget, logging and checkpointing are one call
each. The learning rate is computed per step from the step counter alone; resume is one call
(``restore_checkpoint``) that restores model, optimiser, method state, samplers, RNG and the step counter.

Several processes (torchrun, SLURM): ``train`` joins the process group itself, rank 0 prepares the run directory
and the dataset cache before the others start, the model is wrapped in DDP with SyncBatchNorm, logged values are
averaged over processes, and only rank 0 writes files or prints. Decisions every process must take alike (a
non-finite loss, a spent time budget, Ctrl-C) are taken on all-reduced numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from paws_cli.collectives import max_over_processes, mean_over_processes
from paws_cli.config import Settings
from paws_cli.train.checkpoint_io import save_checkpoint
from paws_cli.train.guards import NonFiniteLossError, TrainingInterruptedError
from paws_cli.train.run_state import checkpoint_state
from paws_cli.train.rundir import release_run_dir, run_dir_of
from paws_cli.train.setup import Run, set_up
from paws_cli.train.step import autocast_for, backward_and_step

__all__ = ["NonFiniteLossError", "TrainResult", "TrainingInterruptedError", "train", "train_one_epoch"]


@dataclass
class TrainResult:
    """What a finished `train` call reports (on every process; only rank 0 wrote the files)."""

    run_dir: Path
    checkpoint: Path
    steps: int
    train_seconds: float
    images_per_second: float
    data_fraction: float
    last_epoch: dict[str, float] = field(default_factory=dict)
    world_size: int = 1
    is_main: bool = True
    already_complete: bool = False  # --resume found the run finished and changed nothing


def train(
    settings: Settings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    default_name: str = "run",
) -> TrainResult:
    """Train `settings.method` in this process, or in each of torchrun's processes (one per GPU).

    resume: continue the run in its directory from checkpoint.pt (on any number of processes that keeps the
    global batch); a finished run is left as it is. overwrite: start again in an existing run directory. The run
    directory stays locked against other processes until this returns or raises. SIGINT/SIGTERM end the current
    step, save a checkpoint and raise TrainingInterruptedError.
    """
    try:
        run = set_up(
            settings, resume=resume, overwrite=overwrite, console=console or Console(), name=default_name
        )
        if run.complete:
            return _result(run, already_complete=True)
        with run.progress, run.signals:
            for epoch in range(run.step // run.data.steps_per_epoch, run.last_epoch_index):
                if train_one_epoch(run, epoch):
                    break
        run.finish()
        if run.signals.requested:
            raise TrainingInterruptedError(_interrupted_message(run), run.checkpoint_path)
        return _result(run)
    finally:
        release_run_dir(run_dir_of(settings, default_name))


def train_one_epoch(run: Run, epoch: int) -> bool:
    """The remaining steps of ``epoch``; True when training must stop (last step, budget spent, interrupted)."""
    model, method, settings = run.model, run.method, run.settings
    model.train()
    meter = run.epoch_meter()
    stop = False
    for batch, started, waited in _timed(run.data.epoch(epoch, first_step=run.step)):
        run.guard.snapshot(model)
        with autocast_for(run.device, settings.run.precision):
            loss, logs = method.loss(model, batch)
        # One collective decides for every process: any loss non-finite, the budget time, a stop signal.
        bad, elapsed, signalled = max_over_processes(
            [(~torch.isfinite(loss.detach())).double(), run.clock.elapsed(), run.signals.requested]
        )
        lr = run.set_lr(elapsed)
        if not run.guard.skip(bad, model, loss, (run.step, epoch, run.ctx.rank), lr):
            backward_and_step(loss, run.optimizer, run.scaler)
            method.after_step(model, run.step + 1, run.planned_steps(elapsed))
            meter.add(logs)
        run.step += 1
        meter.count += 1
        run.account(waited, time.perf_counter() - started)
        if run.step % settings.run.log_every == 0 or run.step == run.last_stop:
            _log_step(run, epoch, lr, logs)
        run.budget_spent = run.clock.spent(elapsed)
        if run.step >= run.last_stop or run.budget_spent or signalled:
            stop = True
            break
        every = settings.run.checkpoint_every_steps
        if every and run.step % every == 0 and run.step % run.data.steps_per_epoch:
            # 'latest' inside an epoch (epoch ends save below): a killed job loses at most N steps.
            partial = meter.partial(mean_over_processes(meter.sums))  # every process reaches this step
            if run.is_main:
                _save(run, epoch, epoch_done=False, partial=partial)
            run.guard.last_good = run.checkpoint_path
    _end_epoch(run, epoch, meter, stop)
    return stop


def _timed(batches: Iterator[Any]) -> Iterator[tuple[Any, float, float]]:
    """(batch, time the fetch started, seconds spent waiting for it)."""
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        yield batch, started, time.perf_counter() - started


def _log_step(run: Run, epoch: int, lr: float, logs: dict[str, Any]) -> None:
    values = {k: round(v, 6) for k, v in mean_over_processes(logs).items()}
    if run.data.skipped_images:  # unreadable images replaced so far (this process's count)
        values["skipped_images"] = run.data.skipped_images
    record = {"step": run.step, "epoch": epoch, "lr": lr, **values, "images_per_s": round(run.speed(), 1)}
    record["data_wait_share"] = round(run.data_seconds / max(run.train_seconds, 1e-9), 4)  # this session's
    if run.guard.skipped:
        record["skipped_nonfinite"] = run.guard.skipped
    if run.step_log:
        run.step_log.write(record)
    run.progress.update(run.step, values, lr, run.speed())


def _end_epoch(run: Run, epoch: int, meter: Any, stop: bool) -> None:
    """Epoch averages, the epoch log line and the epoch-end checkpoint (a partial one when cut short)."""
    if not meter.count:
        return
    totals = mean_over_processes(meter.sums)
    run.last_epoch = {k: v / meter.finite for k, v in totals.items()} if meter.finite else {}
    run.guard.last_good = run.checkpoint_path  # rank 0 saves it just below
    epoch_done = not stop or run.step % run.data.steps_per_epoch == 0
    if not run.is_main:
        return
    run.epoch_log.write({"epoch": epoch, "step": run.step, "complete": epoch_done, **run.last_epoch})
    run.progress.epoch_summary(epoch, run.last_epoch)
    state = _save(run, epoch, epoch_done=epoch_done, partial=None if epoch_done else meter.partial(totals))
    every = run.settings.run.checkpoint_every
    if every and epoch_done and (epoch + 1) % every == 0:
        save_checkpoint(run.run_dir / f"checkpoint-epoch{epoch + 1}.pt", state)


def _save(run: Run, epoch: int, *, epoch_done: bool, partial: dict[str, Any] | None) -> dict[str, Any]:
    """Write the run's checkpoint (rank 0); the one place a training checkpoint is built."""
    extra: dict[str, Any] = {
        "labelled_source": run.labelled_source,
        "nonfinite_skipped": run.guard.skipped,
        "budget_elapsed_s": run.clock.elapsed(),
        "budget_spent": run.budget_spent,
        "train_seconds": run.train_seconds_before + run.train_seconds,
    }
    if partial is not None:
        extra["epoch_partial"] = partial
    state = checkpoint_state(
        settings=run.settings,
        method=run.method,
        model=run.model,
        optimizer=run.optimizer,
        scaler=run.scaler,
        data=run.data,
        step=run.step,
        epoch=epoch,
        epoch_done=epoch_done,
        extra=extra,
    )
    save_checkpoint(run.checkpoint_path, state)
    return state


def _interrupted_message(run: Run) -> str:
    resolved = run.run_dir / "resolved_config.yaml"
    return (
        f"interrupted by {run.signals.name} after step {run.step}: checkpoint saved to {run.checkpoint_path}. "
        f"Continue with the same command plus --resume, e.g. paws pretrain --recipe {resolved} --resume"
    )


def _result(run: Run, *, already_complete: bool = False) -> TrainResult:
    return TrainResult(
        run_dir=run.run_dir,
        checkpoint=run.checkpoint_path,
        steps=run.step,
        train_seconds=run.train_seconds_before if already_complete else run.train_seconds,
        images_per_second=run.speed(),
        data_fraction=run.data_seconds / max(run.train_seconds, 1e-9),
        last_epoch=run.last_epoch,
        world_size=run.ctx.world_size,
        is_main=run.is_main,
        already_complete=already_complete,
    )
