"""Setting a training run up: process group, run directory, data, method, model, optimiser, schedule, then
resume or a fresh start. ``set_up`` returns a :class:`Run`, everything the loop reads and updates."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from paws_cli.collectives import mean_over_processes
from paws_cli.config import Settings
from paws_cli.config.paths import with_absolute_paths
from paws_cli.data.needs import needs_of
from paws_cli.data.sources import TrainDataLike, build_train_data
from paws_cli.data.splits.files import write_split
from paws_cli.data.view_sizes import fit_views
from paws_cli.method_registry import method_class
from paws_cli.methods import Method, create_method
from paws_cli.optim import StepSchedule, create_optimizer, schedule_lengths
from paws_cli.train.banner import (
    describe_compute,
    describe_globals,
    images_per_step,
    labelled_only,
    slow_bf16_warning,
    start_line,
    world_size_warning,
)
from paws_cli.train.guards import BudgetClock, NonFiniteGuard, StopSignals
from paws_cli.train.process_group import DistContext, barrier, init_distributed, main_first, wrap_model
from paws_cli.train.progress import TrainProgress
from paws_cli.train.run_state import restore_checkpoint
from paws_cli.train.rundir import (
    CHECKPOINT,
    JsonlWriter,
    prepare_run_dir,
    run_dir_of,
    trim_logs,
    write_resolved_config,
)
from paws_cli.train.step import make_grad_scaler
from paws_cli.train.tensorboard_log import check_tensorboard, open_metric_logs


@dataclass
class EpochMeter:
    """Steps of an epoch, those with a finite loss, and the sums of their logged values (a checkpoint taken
    inside an epoch carries them, averaged over processes)."""

    count: int = 0
    finite: int = 0
    sums: dict[str, Any] = field(default_factory=dict)

    def add(self, logs: dict[str, Any]) -> None:
        self.finite += 1
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def partial(self, totals: dict[str, float]) -> dict[str, Any]:
        return {"count": self.count, "finite": self.finite, "sums": totals}


@dataclass
class Run:
    """One process's training run: what was built, and the counters the loop advances."""

    settings: Settings
    console: Console
    ctx: DistContext
    run_dir: Path
    data: TrainDataLike
    method: Method
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: StepSchedule
    scaler: torch.amp.GradScaler | None
    total_steps: int
    labelled_source: str
    step: int = 0
    complete: bool = False  # resumed from a checkpoint of a finished run: nothing to train
    budget_spent: bool = False
    partial: dict[str, Any] = field(default_factory=dict)
    last_epoch: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0  # this session
    train_seconds_before: float = 0.0  # earlier sessions of a resumed run
    data_seconds: float = 0.0
    steps_this_session: int = 0
    guard: NonFiniteGuard = field(init=False)
    clock: BudgetClock = field(init=False)
    signals: StopSignals = field(default_factory=StopSignals)
    progress: TrainProgress = field(init=False)
    step_log: JsonlWriter | None = None
    epoch_log: JsonlWriter | None = None
    notes: list[str] = field(default_factory=list)  # printed at start: view sizes against the data

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    @property
    def unbounded(self) -> bool:
        """A time-budgeted run trains until its budget is spent (its schedule follows elapsed time)."""
        return self.settings.run.time_budget_s is not None

    @property
    def last_stop(self) -> int:
        """The step this run stops after: the schedule's end, or run.max_steps (total steps of the run)."""
        max_steps = self.settings.run.max_steps
        end = sys.maxsize if self.unbounded else self.total_steps
        return min(end, max_steps) if max_steps else end

    @property
    def last_epoch_index(self) -> int:
        return sys.maxsize if self.unbounded else math.ceil(self.total_steps / self.data.steps_per_epoch)

    def set_lr(self, elapsed: float) -> float:
        """This step's learning rate: from the step counter, or from the budget share on time-budgeted runs."""
        if self.settings.run.time_budget_s:
            return self.schedule.set_progress(self.clock.progress(elapsed))
        return self.schedule.set(self.step)

    def planned_steps(self, elapsed: float) -> int:
        """The run's total steps as a method's per-step schedule sees them (an EMA): the schedule's steps, or on a
        time-budgeted run the steps the budget will allow at the pace so far (so step / total follows the
        budget share, as the learning rate does)."""
        if not self.settings.run.time_budget_s:
            return self.total_steps
        share = self.clock.progress(elapsed)
        return max(self.step + 1, round((self.step + 1) / share)) if share > 0 else sys.maxsize

    def epoch_meter(self) -> EpochMeter:
        partial, self.partial = self.partial, {}
        return EpochMeter(
            int(partial.get("count", 0)), int(partial.get("finite", 0)), dict(partial.get("sums", {}))
        )

    def account(self, waited: float, seconds: float) -> None:
        self.data_seconds += waited
        self.train_seconds += seconds
        self.steps_this_session += 1

    def speed(self) -> float:
        """Images per second over this session's steps: unlabelled ones, or labelled ones for a method that
        reads only those (the supervised baseline)."""
        images = images_per_step(self.settings, self.ctx.world_size)[0] * self.steps_this_session
        return images / max(self.train_seconds, 1e-9)

    def finish(self) -> None:
        """Close the logs and report unreadable images met on the way (all processes call it)."""
        for writer in (self.step_log, self.epoch_log):
            if writer:
                writer.close()
        unreadable = round(
            mean_over_processes({"n": float(self.data.skipped_images)})["n"] * self.ctx.world_size
        )
        if self.is_main and unreadable:
            distinct = sorted(set(self.data.skipped_files))
            self.console.print(
                f"warning: unreadable images were met {unreadable} time(s) (counted per read, as an unlabelled "
                f"image or a support) and replaced by others of their batch (data.bad_images=skip); "
                f"{len(distinct)} distinct file(s) here, e.g. {distinct[:3]}",
                style="yellow",
                markup=False,  # file names may hold brackets
                highlight=False,
            )
        barrier()  # nobody returns (and reads the checkpoint, or resumes) before rank 0 has written it


def set_up(settings: Settings, *, resume: bool, overwrite: bool, console: Console, name: str) -> Run:
    """Everything before the first step, in this order (the order fixes the initial weights)."""
    settings = with_absolute_paths(settings)  # what the run records works from any directory
    settings, notes = fit_views(settings)  # views sized from the data, or a warning when they differ from it
    check_tensorboard(settings.run.tensorboard)  # before any work: a missing extra fails at once
    ctx = init_distributed(settings.run)
    if settings.run.num_threads:
        torch.set_num_threads(settings.run.num_threads)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_flush_denormal(True)  # tiny weights late in training otherwise slow CPU kernels down
    torch.manual_seed(
        settings.run.seed
    )  # the same initial weights on every process (DDP also broadcasts rank 0's)
    # Rank 0 applies the run-directory policy and converts the dataset into the cache; the others wait for it.
    path = run_dir_of(settings, name)
    run_dir = main_first(
        ctx, lambda: prepare_run_dir(path, resume=resume, overwrite=overwrite, lock=True), lambda: path
    )
    run = _build(settings, ctx, run_dir, console)
    run.notes = notes
    state = _resume(run) if resume else {}
    run.guard = NonFiniteGuard(
        settings.run.skip_nonfinite_steps, int(state.get("nonfinite_skipped", 0)), console, run.is_main
    )
    run.guard.last_good = run.checkpoint_path if resume else None
    run.clock = BudgetClock(settings.run.time_budget_s, float(state.get("budget_elapsed_s", 0.0)))
    run.progress = TrainProgress(
        console,
        total=None if run.unbounded else min(run.total_steps, run.last_stop),
        start=run.step,
        enabled=run.is_main and settings.run.progress and not run.complete,
        budget_left_s=None if run.clock.budget_s is None else run.clock.budget_s - run.clock.elapsed(),
    )
    if not run.complete:
        _start_logs(run, resumed=resume)
    return run


def _build(settings: Settings, ctx: DistContext, run_dir: Path, console: Console) -> Run:
    """Data, method, model (on the device, wrapped), optimiser, schedule and loss scaler."""
    needs = method_class(settings.method).data_needs(settings)
    # data.format picks the back end (in-memory arrays, JPEG folder, FFCV); see paws_cli.data.sources.
    data = main_first(
        ctx,
        lambda: build_train_data(
            settings, needs, device=ctx.device, world_size=ctx.world_size, rank=ctx.rank
        ),
    )
    method = create_method(settings, in_chans=data.in_chans, num_classes=data.num_classes)
    model = method.build_model().to(ctx.device)
    if settings.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = wrap_model(model, ctx, settings.model)
    optimizer = create_optimizer(getattr(model, "module", model), settings.optim)
    # in epochs or in steps; a warm-up as long as training is an error naming the settings
    total_steps, _ = schedule_lengths(settings.optim, data.steps_per_epoch)
    schedule = StepSchedule(optimizer, settings.optim, total_steps, data.steps_per_epoch)
    scaler = make_grad_scaler(ctx.device, settings.run.precision)
    return Run(
        settings,
        console,
        ctx,
        run_dir,
        data,
        method,
        model,
        optimizer,
        schedule,
        scaler,
        total_steps,
        labelled_source=data.labelled_description,
    )


def _resume(run: Run) -> dict[str, Any]:
    """Restore the checkpoint into ``run``; a finished run is marked complete and nothing is written."""
    state = restore_checkpoint(
        run.checkpoint_path,
        settings=run.settings,
        method=run.method,
        model=run.model,
        optimizer=run.optimizer,
        scaler=run.scaler,
        data=run.data,
    )
    run.step = int(state["step"])
    run.partial = dict(state.get("epoch_partial") or {})
    run.train_seconds_before = float(state.get("train_seconds", 0.0))
    run.complete = run.step >= run.last_stop or bool(state.get("budget_spent"))
    if run.is_main and run.complete:
        run.console.print(
            f"run {run.run_dir} is already complete: step {run.step} of {run.last_stop if not run.unbounded else run.step} "
            f"(checkpoint {run.checkpoint_path}); nothing was changed. To train longer, raise optim.epochs or "
            "run.max_steps in a new run; to start again, pass --overwrite."
        )
    elif run.is_main:
        epoch = run.step // run.data.steps_per_epoch
        within = run.step - epoch * run.data.steps_per_epoch
        run.console.print(
            f"resuming {run.run_dir} from {run.checkpoint_path}: step {run.step} of {run.last_stop}, epoch {epoch}"
            + (f" (step {within} of {run.data.steps_per_epoch} in it)" if within else "")
        )
    return state


def _start_logs(run: Run, *, resumed: bool) -> None:
    """Rank 0: trim logs of steps to be trained again, write the resolved settings and labelled list, print the
    run's banner, and open the JSONL logs."""
    if not run.is_main:
        return
    settings, data, console = run.settings, run.data, run.console
    if resumed:
        trim_logs(run.run_dir, run.step)  # steps a killed run logged after its checkpoint are trained again
    write_resolved_config(run.run_dir, settings)
    write_split(
        run.run_dir / "labelled.txt",
        data.labelled.tolist(),
        {"dataset": data.name, "source": run.labelled_source},
    )
    console.print(start_line(settings, run.run_dir))
    console.print(f"compute: {describe_compute(settings, run.ctx)}")
    console.print(f"data: {data.describe()}; labelled: {run.labelled_source}")
    for note in run.notes:
        style = "yellow" if note.startswith("warning") else None
        console.print(note, style=style, markup=False, highlight=False)
    if data.supports is not None and needs_of(settings).support is not None and not labelled_only(settings):
        console.print(data.supports.describe())  # a labelled-only method's batch has its own line below
    for line in describe_globals(settings, run.ctx.world_size, data.steps_per_epoch, run.total_steps):
        console.print(f"  {line}")
    for warning in (world_size_warning(settings, run.ctx.world_size), slow_bf16_warning(settings, run.ctx)):
        if warning:
            console.print(warning, style="yellow", markup=False, highlight=False)
    run.step_log, run.epoch_log = open_metric_logs(
        run.run_dir, tensorboard=run.settings.run.tensorboard, resumed_at=run.step if resumed else None
    )
