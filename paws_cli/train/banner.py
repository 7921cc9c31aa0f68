"""What a run prints before its first step: compute, data and the resolved global sizes a user checks before
spending GPU-hours, and a warning when the process count differs from the recipe's."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from paws_cli.config import Settings
from paws_cli.data.needs import needs_of
from paws_cli.method_registry import method_class
from paws_cli.methods.sizes import GlobalSizes, global_sizes
from paws_cli.train import step as train_step
from paws_cli.train.process_group import DistContext


def describe_compute(settings: Settings, ctx: DistContext) -> str:
    """Device, processes and the speed switches, as the first lines of a run show them."""
    m, run = settings.model, settings.run
    parts = [ctx.describe() if ctx.world_size > 1 else f"device {ctx.device}"]
    if ctx.world_size > 1:
        sync = m.sync_batchnorm and ctx.device.type != "cpu"
        parts.append("DDP, SyncBatchNorm" if sync else "DDP, per-process BatchNorm")
    precision = train_step.resolve_precision(ctx.device, run.precision)
    text = "fp32" if precision == "fp32" else f"{precision} autocast (loss in fp32)"
    if run.precision == "auto":
        text += f" (run.precision=auto{'' if ctx.device.type == 'cuda' else ': ' + _cpu_bf16_text()})"
    parts.append(text)
    if precision == "fp16" and ctx.device.type == "cuda":
        parts.append("grad scaler")
    parts.append("channels_last" if m.channels_last else "contiguous NCHW")
    parts.append("torch.compile(backbone)" if m.compile else "eager")
    return ", ".join(parts)


def _cpu_bf16_text() -> str:
    return (
        "this CPU has bf16 kernels" if train_step.cpu_has_bf16_kernels() else "this CPU has no bf16 kernels"
    )


def slow_bf16_warning(settings: Settings, ctx: DistContext) -> str | None:
    """A warning when bf16 is asked for on a CPU without bf16 kernels, where it is many times slower than fp32."""
    if settings.run.precision != "bf16" or ctx.device.type != "cpu" or train_step.cpu_has_bf16_kernels():
        return None
    return (
        "warning: run.precision=bf16 on a CPU without bf16 kernels (no AVX512/AMX): autocast runs reference code, "
        "about 10x slower than fp32 here; pass run.precision=fp32 (or auto, which picks bf16 only where it is fast)"
    )


def describe_globals(settings: Settings, world: int, steps_per_epoch: int, total_steps: int) -> list[str]:
    """The resolved global numbers: processes, batch, support, learning rates and steps."""
    o = settings.optim
    sizes = global_sizes(settings, world)
    lines = [
        f"processes: {world}"
        + (f" (recipe written for {settings.world_size})" if world != settings.world_size else "")
    ]
    if sizes.batch:
        lines.append(
            f"global unlabelled batch: {sizes.batch} ({o.batch_size} per process), views {_views_text(settings)}"
            + (f" (+ a labelled sub-batch of {sizes.sub_batch} images)" if sizes.sub_batch else "")
        )
    if sizes.support is not None:
        lines.append(labelled_batch_line(sizes) if labelled_only(settings) else sizes.support_line())
    return lines + schedule_lines(settings, steps_per_epoch, total_steps)


def schedule_lines(settings: Settings, steps_per_epoch: int, total_steps: int) -> list[str]:
    """The learning-rate line and the steps line: the steps the run will take (its schedule's, run.max_steps',
    or as many as its time budget allows) and what an epoch means for it."""
    o, run = settings.optim, settings.run
    if o.total_steps is not None:
        epochs = total_steps / steps_per_epoch
        steps = f"steps: {total_steps} (optim.total_steps; {epochs:.3g} epochs of {steps_per_epoch} steps)"
    else:
        steps = f"steps: {steps_per_epoch} per epoch x {o.epochs} epochs = {total_steps}"
    if labelled_only(settings):  # it reads no unlabelled image, yet its epochs are PAWS's
        steps += (
            " (epochs as PAWS counts them: passes over the unlabelled images in optim.batch_size batches)"
        )
    warmup = o.warmup_text()
    if run.time_budget_s is not None:  # the schedule is stretched over the budget's time, not its steps
        warmup = f"the first {_warmup_share(settings, steps_per_epoch, total_steps)} of the time budget"
        steps = (
            f"steps: as many as the time budget of {run.time_budget_s:g} s allows (run.time_budget_s; the "
            f"learning rate follows the share of the budget spent)"
        )
    if run.max_steps is not None:
        steps += f"; this run stops after run.max_steps={run.max_steps} steps at most"
    lr = (
        f"lr: {o.start_lr} -> {o.lr} over {warmup}, cosine to {o.final_lr}; "
        f"{o.optimizer}, weight decay {o.weight_decay}"
    )
    return [lr, steps]


def _warmup_share(settings: Settings, steps_per_epoch: int, total_steps: int) -> str:
    """The warm-up as a share of the schedule ('8%'): what a time-budgeted run spends of its budget on it."""
    o = settings.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else round((o.warmup_epochs or 0) * steps_per_epoch)
    return f"{100 * min(warmup, total_steps) / total_steps:.0f}%"


def _views_text(settings: Settings) -> str:
    """'2x28px + 4x16px': the views of each unlabelled image, as the method asks for them."""
    needs = needs_of(settings)
    if needs.views is None:
        a = settings.augment
        return f"2x{a.large_size}px" + (f" + {a.num_small}x{a.small_size}px" if a.num_small else "")
    sizes = [spec.size for spec in needs.views]
    return " + ".join(f"{sizes.count(size)}x{size}px" for size in dict.fromkeys(sizes))


def world_size_warning(settings: Settings, world: int) -> str | None:
    """What running on ``world`` processes changes when the recipe was written for another number, or None.

    Sizes are per process, so the global batch and support scale with the process count while the learning
    rates (absolute values for the recipe's global batch) stay: say so, and which per-process sizes would
    keep the recipe's global numbers.
    """
    planned = settings.world_size
    if world == planned:
        return None
    o = settings.optim
    now, want = global_sizes(settings, world), global_sizes(settings, planned)
    want_batch = settings.optim.batch_size * planned
    keep = [f"optim.batch_size={want_batch // world}"] if want_batch % world == 0 else []
    needed = 1
    support = ""
    if now.support is not None:
        needed = 2
        shape = now.support
        if shape.unique_classes_per_rank and want.support_classes % world == 0:
            keep.append(f"{shape.section}.classes_per_batch={want.support_classes // world}")
        elif not shape.unique_classes_per_rank and want.support_images % world == 0:
            keep.append(f"{shape.section}.images_per_class={want.support_images // world}")
        support = (
            f" and the global support {now.support_classes} classes x {now.support_images} images (recipe: "
            f"{want.support_classes} x {want.support_images})"
        )
    hint = (
        f"To keep the recipe's global numbers, set {' '.join(keep)} world_size={world}, or adjust the "
        "learning rates yourself."
        if len(keep) == needed
        else "The recipe's global numbers cannot be kept exactly on this many processes: adjust the sizes or "
        "the learning rates yourself."
    )
    return (
        f"warning: running on {world} process(es), but the recipe was written for world_size={planned}. "
        f"Batch and support sizes are per process and are kept, so the global unlabelled batch is "
        f"{o.batch_size * world} (recipe: {want_batch}){support}; steps per epoch change with them. The learning "
        f"rates ({o.start_lr} -> {o.lr} -> {o.final_lr}) are absolute values for the recipe's global batch and "
        f"are used unchanged. {hint}"
    )


def method_title(method: str) -> str:
    """How output names a method: its class's title ('PAWS', 'SemPPL'), else its registered name."""
    return method_class(method).title or method


def labelled_only(settings: Settings) -> bool:
    """Whether the method trains on labelled images alone (the supervised baseline): no unlabelled batch."""
    needs = needs_of(settings)
    return not (needs.unlabelled_views or needs.labels_in_batch or needs.labelled_sub_batch is not None)


def start_line(settings: Settings, run_dir: Path) -> str:
    """The run's first line (rich markup): what trains, and where it writes."""
    title, where = method_title(settings.method), escape(str(run_dir))
    if labelled_only(settings):
        return f"[bold]{title}[/]: training on the labelled images only -> {where}"
    return f"[bold]{title}[/] pretraining -> {where}"


def labelled_batch_line(sizes: GlobalSizes) -> str:
    """A labelled-only method's batch, all processes: 'global labelled batch: 10 classes x 8 images = 80'."""
    views = f" x {sizes.support_views} views" if sizes.support_views > 1 else ""
    return (
        f"global labelled batch: {sizes.support_classes} classes x {sizes.support_images} images{views} = "
        f"{sizes.support_total} labelled images per step"
    )


def images_per_step(settings: Settings, world: int) -> tuple[int, str]:
    """(images a step trains on, all processes; 'unlabelled' or 'labelled'): what images/s counts."""
    sizes = global_sizes(settings, world)
    return (sizes.batch, "unlabelled") if sizes.batch else (sizes.support_total, "labelled")
