"""The training loop shared by every method. Reads top to bottom: set-up, resume, steps, epoch ends.

The learning rate is computed per step from the step counter alone; resume is one call (`_resume`) that
restores model, optimiser, samplers, RNG and the step counter.

Several processes (torchrun, SLURM): `train` joins the process group itself (`init_distributed`), rank 0
prepares the run directory and the dataset cache before the others start, the model is wrapped in DDP with
SyncBatchNorm, logged values are averaged over processes, and only rank 0 writes files or prints. Decisions
every process must take alike (a non-finite loss, a spent time budget) are taken on all-reduced numbers.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from paws_cli.config import Settings
from paws_cli.data.sources import TrainDataLike, build_train_data
from paws_cli.data.splits import write_split
from paws_cli.distributed import max_over_processes, mean_over_processes
from paws_cli.methods import METHODS, create_method
from paws_cli.optim import StepSchedule, create_optimizer
from paws_cli.train.checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from paws_cli.train.distributed_setup import (
    DistContext,
    barrier,
    init_distributed,
    main_first,
    resolve_device,
    wrap_model,
)
from paws_cli.train.progress import TrainProgress
from paws_cli.train.rundir import (
    CHECKPOINT,
    JsonlWriter,
    prepare_run_dir,
    release_run_dir,
    run_dir_of,
    trim_logs,
    write_resolved_config,
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, the lr and the last good checkpoint."""


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


__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "autocast_for",
    "backward_and_step",
    "describe_globals",
    "make_grad_scaler",
    "resolve_device",
    "train",
    "world_size_warning",
]


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for the network's forward; the losses switch it off for themselves (float32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("run.precision=fp16 needs a CUDA device; use run.precision=bf16 on the CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 on CUDA (bf16 has fp32's range and needs none); None otherwise."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None


def backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Gradients of `loss` and one optimiser step; with a scaler the gradients are unscaled before the step
    (LARS reads their norms) and steps with inf/NaN gradients are skipped while the scale shrinks."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def describe_compute(settings: Settings, ctx: DistContext) -> str:
    """Device, processes and the speed switches, as the first lines of a run show them."""
    m, run = settings.model, settings.run
    parts = [ctx.describe() if ctx.world_size > 1 else f"device {ctx.device}"]
    if ctx.world_size > 1:
        sync = m.sync_batchnorm and ctx.device.type != "cpu"
        parts.append("DDP, SyncBatchNorm" if sync else "DDP, per-process BatchNorm")
    parts.append("fp32" if run.precision == "fp32" else f"{run.precision} autocast (loss in fp32)")
    if run.precision == "fp16" and ctx.device.type == "cuda":
        parts.append("grad scaler")
    parts.append("channels_last" if m.channels_last else "contiguous NCHW")
    parts.append("torch.compile(backbone)" if m.compile else "eager")
    return ", ".join(parts)


def describe_globals(settings: Settings, data: TrainDataLike, world: int, total_steps: int) -> list[str]:
    """The resolved global numbers a user checks before spending GPU-hours."""
    o, s, a = settings.optim, settings.support, settings.augment
    lines = [
        f"processes: {world}"
        + (f" (recipe written for {settings.world_size})" if world != settings.world_size else ""),
        f"global unlabelled batch: {o.batch_size * world} ({o.batch_size} per process), views 2x{a.large_size}px"
        + (f" + {a.num_small}x{a.small_size}px" if a.num_small else ""),
    ]
    if settings.method == "paws" or settings.method == "supervised":
        unique = s.unique_classes_per_rank
        classes = s.classes_per_batch * (world if unique else 1)
        images = s.images_per_class * (1 if unique else world)
        lines.append(
            f"global support: {classes} classes x {images} images x {a.support_views} view(s) = "
            f"{s.classes_per_batch * s.images_per_class * a.support_views * world} per step"
        )
    lines.append(
        f"lr: {o.start_lr} -> {o.lr} over {o.warmup_epochs} warm-up epochs, cosine to {o.final_lr}; "
        f"{o.optimizer}, weight decay {o.weight_decay}"
    )
    lines.append(f"steps: {data.steps_per_epoch} per epoch x {o.epochs} epochs = {total_steps}")
    return lines


def _global_support(settings: Settings, world: int) -> tuple[int, int]:
    """(classes, images per class) of the global support on ``world`` processes (spec section 2)."""
    s = settings.support
    if s.unique_classes_per_rank:
        return s.classes_per_batch * world, s.images_per_class
    return s.classes_per_batch, s.images_per_class * world


def world_size_warning(settings: Settings, world: int) -> str | None:
    """What running on ``world`` processes changes when the recipe was written for another number, or None.

    Sizes are per process, so the global batch and support scale with the process count while the learning
    rates (absolute values for the recipe's global batch) stay: say so, and which per-process sizes would
    keep the recipe's global numbers.
    """
    planned = settings.world_size
    if world == planned:
        return None
    o, s = settings.optim, settings.support
    batch, want_batch = o.batch_size * world, o.batch_size * planned
    classes, images = _global_support(settings, world)
    want_classes, want_images = _global_support(settings, planned)
    keep = []
    if want_batch % world == 0:
        keep.append(f"optim.batch_size={want_batch // world}")
    if s.unique_classes_per_rank and want_classes % world == 0:
        keep.append(f"support.classes_per_batch={want_classes // world}")
    elif not s.unique_classes_per_rank and want_images % world == 0:
        keep.append(f"support.images_per_class={want_images // world}")
    hint = (
        f"To keep the recipe's global numbers, set {' '.join(keep)} world_size={world}, or adjust the "
        "learning rates yourself."
        if len(keep) == 2
        else "The recipe's global numbers cannot be kept exactly on this many processes: adjust the sizes or "
        "the learning rates yourself."
    )
    return (
        f"warning: running on {world} process(es), but the recipe was written for world_size={planned}. "
        f"Batch and support sizes are per process and are kept, so the global unlabelled batch is {batch} "
        f"(recipe: {want_batch}) and the global support {classes} classes x {images} images (recipe: "
        f"{want_classes} x {want_images}); steps per epoch change with them. The learning rates "
        f"({o.start_lr} -> {o.lr} -> {o.final_lr}) are absolute values for the recipe's global batch and are used "
        f"unchanged. {hint}"
    )


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
    global batch); overwrite: start again in an existing run directory. The run directory stays locked
    against other processes until this returns or raises.
    """
    try:
        return _train(
            settings, resume=resume, overwrite=overwrite, console=console, default_name=default_name
        )
    finally:
        release_run_dir(run_dir_of(settings, default_name))


def _train(
    settings: Settings, *, resume: bool, overwrite: bool, console: Console | None, default_name: str
) -> TrainResult:
    console = console or Console()
    run = settings.run
    ctx = init_distributed(run)
    main, world, device = ctx.is_main, ctx.world_size, ctx.device
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_flush_denormal(True)  # tiny weights late in training otherwise slow CPU kernels down
    torch.manual_seed(run.seed)  # the same initial weights on every process (DDP also broadcasts rank 0's)

    # --- data, model, optimiser ---
    # Rank 0 applies the run-directory policy and converts the dataset into the cache; the others wait for it.
    path = run_dir_of(settings, default_name)
    run_dir = main_first(
        ctx, lambda: prepare_run_dir(path, resume=resume, overwrite=overwrite, lock=True), lambda: path
    )
    # data.format picks the back end (in-memory arrays, JPEG folder, FFCV); see paws_cli.data.sources.
    data = main_first(
        ctx,
        lambda: build_train_data(
            settings,
            device=device,
            world_size=world,
            rank=ctx.rank,
            need_unlabelled=METHODS[settings.method].needs_unlabelled,
        ),
    )
    split_description = data.labelled_description
    method = create_method(settings, in_chans=data.in_chans, num_classes=data.num_classes)
    model = method.build_model().to(device)
    if settings.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = wrap_model(model, ctx, settings.model)
    optimizer = create_optimizer(getattr(model, "module", model), settings.optim)
    steps_per_epoch = data.steps_per_epoch
    total_steps = max(round(settings.optim.epochs * steps_per_epoch), 1)
    schedule = StepSchedule(optimizer, settings.optim, total_steps, steps_per_epoch)
    scaler = make_grad_scaler(device, run.precision)

    step = 0
    checkpoint_path = run_dir / CHECKPOINT
    resumed: dict[str, Any] = {}
    last_good: Path | None = None  # the checkpoint this run can go back to (a non-finite loss names it)
    if resume:
        resumed = _resume(checkpoint_path, settings, model, optimizer, data, scaler)
        step, last_good = int(resumed["step"]), checkpoint_path
        if main:
            trim_logs(run_dir, step)  # steps a killed run logged after its checkpoint are trained again
    # Non-finite steps skipped so far; run.skip_nonfinite_steps bounds them over the whole run, resumes included.
    skipped = int(resumed.get("nonfinite_skipped", 0))
    # A checkpoint taken inside an epoch carries that epoch's metric sums so far (averaged over processes).
    partial: dict[str, Any] = dict(resumed.get("epoch_partial") or {})
    if main:
        write_resolved_config(run_dir, settings)
        write_split(
            run_dir / "labelled.txt",
            data.labelled.tolist(),
            {"dataset": data.name, "source": split_description},
        )
        console.print(f"[bold]paws {settings.method}[/] -> {run_dir}")
        console.print(f"compute: {describe_compute(settings, ctx)}")
        console.print(f"data: {data.describe()}; labelled: {split_description}")
        console.print(data.supports.describe())
        for line in describe_globals(settings, data, world, total_steps):
            console.print(f"  {line}")
        warning = world_size_warning(settings, world)
        if warning:
            console.print(warning, style="yellow", markup=False, highlight=False)

    # --- training ---
    step_log = JsonlWriter(run_dir / "metrics.jsonl") if main else None
    epoch_log = JsonlWriter(run_dir / "epochs.jsonl") if main else None
    # A time-budgeted run trains until its budget is spent (its schedule follows elapsed time), not epochs.
    unbounded = run.time_budget_s is not None
    last_stop = step + run.max_steps if run.max_steps else (sys.maxsize if unbounded else total_steps)
    progress = TrainProgress(
        console,
        total=None if unbounded else min(total_steps, last_stop),
        start=step,
        enabled=main and run.progress,
    )
    images_per_step = settings.optim.batch_size * world
    train_seconds = data_seconds = 0.0
    steps_this_session = 0
    last_epoch: dict[str, float] = {}
    stop = False
    budget_start = time.perf_counter()
    elapsed = 0.0  # budget time agreed by all processes (the largest), so they share lr and stopping step
    with progress:
        last_epoch_index = sys.maxsize if unbounded else math.ceil(total_steps / steps_per_epoch)
        for epoch in range(step // steps_per_epoch, last_epoch_index):
            model.train()
            # Steps of this epoch, those with a finite loss, and the sums of their logged values.
            sums: dict[str, Any] = dict(partial.get("sums", {}))
            count, finite = int(partial.get("count", 0)), int(partial.get("finite", 0))
            partial = {}
            batches = data.epoch(epoch, first_step=step)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                t1 = time.perf_counter()
                # A step that may be skipped must be undoable: its forward updates BatchNorm's running stats.
                may_skip = skipped < run.skip_nonfinite_steps
                buffers = [b.detach().clone() for b in model.buffers()] if may_skip else []
                with autocast_for(device, run.precision):
                    loss, logs = method.loss(model, batch)
                # One collective decides for every process: any loss non-finite, and the budget time spent.
                bad, elapsed = max_over_processes(
                    [(~torch.isfinite(loss.detach())).double(), time.perf_counter() - budget_start]
                )
                if run.time_budget_s:
                    lr = schedule.set_progress(min(elapsed / run.time_budget_s, 1.0))
                else:
                    lr = schedule.set(step)
                if bad and not may_skip:
                    after = f" after skipping {skipped} (run.skip_nonfinite_steps={run.skip_nonfinite_steps})"
                    raise NonFiniteLossError(
                        f"the loss is {loss.item()} at step {step} (epoch {epoch}, lr {lr:.4g}) on rank "
                        f"{ctx.rank} (or another process){after if skipped else ''}; last good checkpoint: "
                        f"{last_good or 'none yet'} (kept). Lower optim.lr or check the data, then continue "
                        "from it with --resume, or allow a few bad steps with run.skip_nonfinite_steps=N."
                    )
                if bad:
                    # Skipped on every process alike (the flag is all-reduced): no update, statistics restored.
                    skipped += 1
                    with torch.no_grad():
                        for buffer, saved in zip(model.buffers(), buffers, strict=True):
                            buffer.copy_(saved)
                    if main:
                        console.print(
                            f"[yellow]warning: non-finite loss at step {step} (lr {lr:.4g}); step skipped "
                            f"({skipped} of run.skip_nonfinite_steps={run.skip_nonfinite_steps})[/]"
                        )
                else:
                    backward_and_step(loss, optimizer, scaler)
                    finite += 1
                    for key, value in logs.items():
                        sums[key] = sums.get(key, 0.0) + value
                step += 1
                count += 1
                t2 = time.perf_counter()
                data_seconds += t1 - t0
                train_seconds += t2 - t0
                steps_this_session += 1
                if step % run.log_every == 0 or step == last_stop:
                    values = {k: round(v, 6) for k, v in mean_over_processes(logs).items()}
                    if data.skipped_images:  # unreadable images replaced so far (this process's count)
                        values["skipped_images"] = data.skipped_images
                    speed = images_per_step * steps_this_session / max(train_seconds, 1e-9)
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "lr": lr,
                        **values,
                        "images_per_s": round(speed, 1),
                        **({"skipped_nonfinite": skipped} if skipped else {}),
                    }
                    if step_log:
                        step_log.write(record)
                    progress.update(step, values, lr, speed)
                budget_spent = run.time_budget_s is not None and elapsed >= run.time_budget_s
                if step >= last_stop or budget_spent:
                    stop = True
                    break
                if (
                    run.checkpoint_every_steps
                    and step % run.checkpoint_every_steps == 0
                    and step % steps_per_epoch
                ):
                    # 'latest' inside an epoch (epoch ends save below): a killed job loses at most N steps.
                    totals = mean_over_processes(sums)  # every process takes this branch at the same step
                    if main:
                        state = _checkpoint_state(
                            settings, model, optimizer, data, scaler, step, epoch, False
                        )
                        state["labelled_source"] = split_description
                        state["nonfinite_skipped"] = skipped
                        state["epoch_partial"] = {"count": count, "finite": finite, "sums": totals}
                        save_checkpoint(checkpoint_path, state)
                    last_good = checkpoint_path
            totals = mean_over_processes(sums) if count else {}
            if count:
                last_epoch = {k: v / finite for k, v in totals.items()} if finite else {}
                last_good = checkpoint_path  # rank 0 saves it just below
            epoch_done = not stop or step % steps_per_epoch == 0
            if main and count:
                record = {"epoch": epoch, "step": step, "complete": epoch_done, **last_epoch}
                epoch_log.write(record)
                progress.epoch_summary(epoch, last_epoch)
                state = _checkpoint_state(settings, model, optimizer, data, scaler, step, epoch, epoch_done)
                state["labelled_source"] = split_description
                state["nonfinite_skipped"] = skipped
                if not epoch_done:
                    state["epoch_partial"] = {"count": count, "finite": finite, "sums": totals}
                save_checkpoint(checkpoint_path, state)
                every = run.checkpoint_every
                if every and epoch_done and (epoch + 1) % every == 0:
                    save_checkpoint(run_dir / f"checkpoint-epoch{epoch + 1}.pt", state)
            if stop:
                break
    for writer in (step_log, epoch_log):
        if writer:
            writer.close()
    unreadable = round(mean_over_processes({"n": float(data.skipped_images)})["n"] * world)
    if main and unreadable:
        distinct = sorted(set(data.skipped_files))
        console.print(
            f"warning: unreadable images were met {unreadable} time(s) (counted per read, as an unlabelled "
            f"image or a support) and replaced by others of their batch (data.bad_images=skip); "
            f"{len(distinct)} distinct file(s) here, e.g. {distinct[:3]}",
            style="yellow",
            markup=False,  # file names may hold brackets
            highlight=False,
        )
    barrier()  # nobody returns (and reads the checkpoint, or resumes) before rank 0 has written it
    speed = images_per_step * steps_this_session / max(train_seconds, 1e-9)
    return TrainResult(
        run_dir=run_dir,
        checkpoint=checkpoint_path,
        steps=step,
        train_seconds=train_seconds,
        images_per_second=speed,
        data_fraction=data_seconds / max(train_seconds, 1e-9),
        last_epoch=last_epoch,
        world_size=world,
        is_main=main,
    )


def _checkpoint_state(
    settings: Settings,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainDataLike,
    scaler: torch.amp.GradScaler | None,
    step: int,
    epoch: int,
    epoch_done: bool,
) -> dict[str, Any]:
    return {
        "method": settings.method,
        "settings": settings.model_dump(mode="json"),
        "model": getattr(model, "module", model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "data": _at_position(data.state_dict(), epoch, step - epoch * data.steps_per_epoch),
        "labelled": data.labelled.clone(),
        "world_size": data.order.world_size,
        "rng": {
            "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(data.device)} if data.device.type == "cuda" else {}),
        },
        "step": step,
        "epoch": epoch,
        "epoch_complete": epoch_done,
    }


def _at_position(state: dict[str, Any], epoch: int, position: int) -> dict[str, Any]:
    """Sampler states placed at the batches actually trained: a prefetching loader may have drawn ahead."""
    return {
        name: {**part, "epoch": epoch, "position": position}
        if isinstance(part, dict) and "position" in part
        else part
        for name, part in state.items()
    }


#: Settings that may differ on resume (everything else must match the checkpoint's).
RESUMABLE_CHANGES = ("run.", "eval.", "slurm.", "finetune.")
#: Per-process sizes that may change on resume together with the number of processes, provided the global
#: batch stays the same (the samplers check that and name what differs).
PER_PROCESS_SIZES = ("optim.batch_size", "support.classes_per_batch", "support.images_per_class")


def _resume(
    path: Path,
    settings: Settings,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainDataLike,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore everything from `path`; return the checkpoint (its step is where training continues)."""
    state = load_checkpoint(path)
    saved = Settings.model_validate(state["settings"]).model_dump(mode="json")
    now = settings.model_dump(mode="json")
    saved_world = int(state["data"]["unlabelled"]["world_size"])
    free = RESUMABLE_CHANGES + (PER_PROCESS_SIZES if saved_world != data.order.world_size else ())
    changed = [
        key
        for key in _flat_keys(now)
        if not key.startswith(free) and _lookup(saved, key) != _lookup(now, key)
    ]
    if changed:
        raise CheckpointError(
            f"cannot resume from {path}: these settings differ from the checkpoint's: {', '.join(changed)}. "
            "Resume with the run's resolved_config.yaml as --recipe, or start a new run."
        )
    if not torch.equal(state["labelled"], data.labelled):
        raise CheckpointError(f"cannot resume from {path}: the labelled subset differs from the checkpoint's")
    load_state_strict(getattr(model, "module", model), state["model"], str(path))
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    try:
        data.load_state_dict(state["data"])
    except ValueError as exc:
        hint = ""
        if saved_world != data.order.world_size:
            hint = f" (settings: {', '.join(PER_PROCESS_SIZES)}, per process)"
        raise CheckpointError(f"cannot resume from {path}: {exc}{hint}") from None
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and data.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], data.device)
    return state


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.extend(_flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
    return keys


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree
