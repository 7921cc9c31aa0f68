"""Training throughput at a recipe's shapes: steps/s, unlabelled images/s, and where the time goes.

    python benchmarks/train_step.py [--recipe fmnist_demo] [--steps 150] [--warmup 20] [key=value ...]

Prints per-step data time (sampling + views on the device) and compute time (forward, loss, backward,
optimiser step). Run on an otherwise idle machine: a second job on 2 cores slows PyTorch several-fold.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from paws_cli.config import load_settings
from paws_cli.data.backends.memory import TrainData, image_channels, labelled_indices, load_dataset
from paws_cli.data.needs import needs_of
from paws_cli.methods import create_method
from paws_cli.optim import StepSchedule, create_optimizer
from paws_cli.train.process_group import resolve_device
from paws_cli.train.step import autocast_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fmnist_demo")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    settings = load_settings(args.recipe, args.overrides)
    if settings.run.num_threads:
        torch.set_num_threads(settings.run.num_threads)
    device = resolve_device(settings.run.device)
    torch.manual_seed(0)
    dataset = load_dataset(settings.data)
    labelled, _ = labelled_indices(settings.data, dataset)
    method = create_method(settings, image_channels(dataset), dataset.num_classes)
    model = method.build_model().to(device)
    data = TrainData(settings, dataset, labelled, device=device, needs=needs_of(settings))
    optimizer = create_optimizer(model, settings.optim)
    schedule = StepSchedule(optimizer, settings.optim, 10_000, data.steps_per_epoch)
    batches = data.epoch(0, 0)
    data_ms, compute_ms = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        schedule.set(step)
        with autocast_for(device, settings.run.precision):
            loss, _ = method.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step >= args.warmup:
            data_ms.append(1000 * (t1 - t0))
            compute_ms.append(1000 * (t2 - t1))
    step_ms = statistics.mean(d + c for d, c in zip(data_ms, compute_ms, strict=True))
    o, a, s = settings.optim, settings.augment, settings.paws
    table = Table(
        title=f"train step, recipe {args.recipe} ({settings.model.backbone}, {torch.get_num_threads()} threads)"
    )
    for col in ("shapes", "data ms", "compute ms", "step ms", "steps/s", "unlabelled img/s", "data share"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{o.batch_size} x (2x{a.large_size} + {a.num_small}x{a.small_size}) + "
        f"{s.classes_per_batch * s.images_per_class * a.support_views} supports",
        f"{statistics.mean(data_ms):.1f}",
        f"{statistics.mean(compute_ms):.1f}",
        f"{step_ms:.1f}",
        f"{1000 / step_ms:.2f}",
        f"{o.batch_size * 1000 / step_ms:.0f}",
        f"{100 * statistics.mean(data_ms) / step_ms:.1f}%",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
