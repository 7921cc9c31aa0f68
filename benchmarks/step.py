"""What a PAWS step costs beyond the network: (a) the full step against (b) the network's forward+backward.

    python benchmarks/step.py [--recipe fmnist_demo] [--batch-scale 1] [--size-scale 1] [--steps 200] [k=v ...]

(a) is the training step as the loop runs it: the grouped forward of supports + views, the PAWS loss (soft
nearest neighbours, sharpened targets, me-max, health signals), the non-finite check, backward and the LARS
step with its learning-rate update, timed by phase to show where the overhead goes. (b) is the backbone +
heads forward and backward on the very same tensors, with fixed random output gradients. a/b - 1 is the
overhead of everything that is not the network; the target is a/b <= 1.05 on the CPU. The two are timed
alternately in one run (a, b, a, b, ...) so that a slower or busier machine affects both alike; the medians
are compared. Inputs are random tensors of the recipe's shapes, scaled down with --batch-scale (unlabelled
batch and images per class) and --size-scale (view sizes) to fit a CPU. Run it on an idle machine: with
2 threads on 2 cores, any other job makes every step several times slower.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from paws_cli.config import Settings, load_settings
from paws_cli.data.sampling.batch import Batch
from paws_cli.methods import create_method
from paws_cli.methods.base import encoder_of
from paws_cli.optim import StepSchedule, create_optimizer
from paws_cli.train.process_group import DistContext, resolve_device, wrap_model
from paws_cli.train.step import autocast_for, make_grad_scaler


def scaled_batch(settings: Settings, device: torch.device, in_chans: int, seed: int = 0) -> Batch:
    """Random views and supports with the recipe's (scaled) shapes, on the device."""
    a, s, o = settings.augment, settings.paws, settings.optim
    gen = torch.Generator().manual_seed(seed)

    def images(n: int, size: int) -> torch.Tensor:
        x = torch.randn(n, in_chans, size, size, generator=gen).to(device)
        return x.contiguous(memory_format=torch.channels_last) if settings.model.channels_last else x

    views = [images(o.batch_size, a.large_size) for _ in range(2)]
    views += [images(o.batch_size, a.small_size) for _ in range(a.num_small)]
    supports = [
        images(s.classes_per_batch * s.images_per_class, a.large_size) for _ in range(a.support_views)
    ]
    classes = torch.arange(s.classes_per_batch).repeat(s.images_per_class).to(device)
    return Batch(views, supports, classes)


def scale_settings(settings: Settings, batch_scale: float, size_scale: float) -> Settings:
    """The recipe with a smaller unlabelled batch, fewer images per support class and smaller views."""
    a, s, o = settings.augment, settings.paws, settings.optim
    return settings.model_copy(
        update={
            "optim": o.model_copy(update={"batch_size": max(1, round(o.batch_size * batch_scale))}),
            "paws": s.model_copy(
                update={"images_per_class": max(1, round(s.images_per_class * batch_scale))}
            ),
            "augment": a.model_copy(
                update={
                    "large_size": max(8, round(a.large_size * size_scale)),
                    "small_size": max(8, round(a.small_size * size_scale)),
                }
            ),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fmnist_demo")
    parser.add_argument(
        "--steps",
        type=int,
        default=200,
        help="timed (a, b) pairs (with 60 the median ratio of the demo recipe moved by +-0.013 between runs)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed pairs first (compilation, caches)")
    parser.add_argument("--batch-scale", type=float, default=1.0)
    parser.add_argument("--size-scale", type=float, default=1.0)
    parser.add_argument("--in-chans", type=int, default=None, help="default: 1 for fashion_mnist, else 3")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    settings = scale_settings(load_settings(args.recipe, args.overrides), args.batch_scale, args.size_scale)
    run = settings.run
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    device = resolve_device(run.device)
    in_chans = args.in_chans or (1 if settings.data.dataset == "fashion_mnist" else 3)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as the training loop does

    torch.manual_seed(0)
    method = create_method(settings, in_chans=in_chans, num_classes=settings.paws.classes_per_batch)
    model = method.build_model().to(device)
    if settings.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = wrap_model(model, DistContext(1, 0, 0, device), settings.model)
    model.train()
    optimizer = create_optimizer(model, settings.optim)
    schedule = StepSchedule(optimizer, settings.optim, total_steps=10_000, steps_per_epoch=100)
    scaler = make_grad_scaler(device, run.precision)
    batch = scaled_batch(settings, device, in_chans)
    inputs = batch.supports + batch.views
    with torch.no_grad(), autocast_for(device, run.precision):
        h, z = model(inputs)
    gen = torch.Generator().manual_seed(1)
    grad_h = torch.randn(h.shape, generator=gen).to(device, h.dtype)
    grad_z = torch.randn(z.shape, generator=gen).to(device, z.dtype)
    same_output = encoder_of(model).prediction is None  # z is h: one output to differentiate

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def full_step(step: int) -> list[float]:
        """(forward + loss + metrics, backward, optimiser step) seconds of the loop's step."""
        t0 = clock()
        schedule.set(step)
        with autocast_for(device, run.precision):
            loss, _ = method.loss(model, batch)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} in the benchmark")
        t1 = clock()
        optimizer.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        t2 = clock()
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        return [t1 - t0, t2 - t1, clock() - t2]

    def network_only() -> list[float]:
        """(forward, backward) seconds of the backbone and heads alone."""
        t0 = clock()
        with autocast_for(device, run.precision):
            h, z = model(inputs)
        t1 = clock()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # the same multiplication of the output gradients as the scaled loss
            h, z = scaler.scale(h), scaler.scale(z)
        if same_output:
            h.backward(grad_h)
        else:
            torch.autograd.backward([h, z], [grad_h, grad_z])
        return [t1 - t0, clock() - t1]

    full_parts, net_parts = [], []
    for i in range(args.warmup + args.steps):
        a, b = full_step(i), network_only()
        if i >= args.warmup:
            full_parts.append(a)
            net_parts.append(b)
    full_s, net_s = [sum(p) for p in full_parts], [sum(p) for p in net_parts]
    full_ms, net_ms = 1000 * statistics.median(full_s), 1000 * statistics.median(net_s)
    ratio = full_ms / net_ms
    a, s, o = settings.augment, settings.paws, settings.optim
    table = Table(
        title=f"PAWS step vs network alone, recipe {args.recipe} ({settings.model.backbone}, {device}, "
        f"{torch.get_num_threads()} threads, {run.precision}"
        f"{', channels_last' if settings.model.channels_last else ''}"
        f"{', compiled backbone' if settings.model.compile else ''})"
    )
    for col in ("shapes", "(a) full step ms", "(b) network f+b ms", "a/b", "target a/b <= 1.05"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{o.batch_size} x (2x{a.large_size} + {a.num_small}x{a.small_size}) + "
        f"{s.classes_per_batch}x{s.images_per_class}x{a.support_views} supports",
        f"{full_ms:.1f}",
        f"{net_ms:.1f}",
        f"{ratio:.3f}",
        "met" if ratio <= 1.05 else "MISSED",
    )
    Console(width=160).print(table)

    def median_ms(parts: list[list[float]], i: int) -> float:
        return 1000 * statistics.median(p[i] for p in parts)

    print(
        f"medians of {args.steps} alternated pairs; means {1000 * statistics.mean(full_s):.1f} / "
        f"{1000 * statistics.mean(net_s):.1f} ms; a/b = {ratio:.3f}\n"
        f"overhead by phase (median a - median b): forward + loss + metrics "
        f"{median_ms(full_parts, 0) - median_ms(net_parts, 0):+.2f} ms, backward "
        f"{median_ms(full_parts, 1) - median_ms(net_parts, 1):+.2f} ms, optimiser step "
        f"{median_ms(full_parts, 2):.2f} ms"
    )


if __name__ == "__main__":
    main()
