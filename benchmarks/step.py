"""What a method's step costs beyond the network: (a) the full step against (b) the network's forward+backward.

    python benchmarks/step.py [--recipe fmnist_demo] [--compare-recipe semppl_fmnist_demo] [--match online]
                              [--batch-scale 1] [--size-scale 1] [--pairs 200] [k=v ...]

(a) is the training step as the loop runs it, for any registered method: ``method.loss`` (the forward of the
trained network, then whatever the method adds: PAWS's soft nearest neighbours, sharpened targets, me-max and
health signals; SemPPL's target-network forward over the L large views without gradient, the k-NN vote over its
queues, the semantic-positive draws and its loss), the non-finite check, backward, the optimiser step with its
learning-rate update, and ``method.after_step`` (SemPPL: the EMA of the target and the enqueue). It is timed by
phase to show where the overhead goes; the forward of the trained (online) network and of a target network are
clocked by hooks inside ``method.loss``. (b) is the trained network (backbone + heads) forward and backward on the
very same tensors (PAWS: supports + views; SemPPL: the L + S online views), with fixed random output gradients.
a/b - 1 is the overhead of everything that is not that network (PAWS's target on the CPU: a/b <= 1.05). The two
are timed alternately in one run (a, b, a, b, ...) so that a slower or busier machine affects both alike; the
medians are compared.

Inputs are random tensors of the shapes the method's ``data_needs`` asks for: its views (each spec's size), a
support batch only when it asks for one, and when it asks for labels in the batch, labels (-1 for unlabelled
images; the labelled sub-batch's rows and ``--labelled-share`` of the others labelled), ids and true labels,
drawn afresh (outside the clocks) at every step from a labelled pool of the recipe's labels per class. A method's
label queues (SemPPL) are filled before the first step, so that the k-NN vote and the positive draws do the work
of a run in its steady state. Shapes are scaled down with --batch-scale (unlabelled batch and support images per
class) and --size-scale (view sizes) to fit a CPU.

--compare-recipe NAME measures a second recipe in the same run, the two alternated pair by pair, at equal images
per step: its optim.batch_size is set so that as many images go through forward+backward as in --recipe's step
(--match online, the default), or as many counting the forward-only images of a target network too (--match all),
or is left as the recipe has it (--match none). It prints the images per step of each and the ratio of the second
recipe's step to the first's, per step and per image. The k=v overrides apply to both recipes.

Run it on an idle machine: with 2 threads on 2 cores, any other job makes every step several times slower. It
prints figures, not verdicts. On CUDA each phase clock synchronises the device.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from paws_cli.config import Settings, load_settings
from paws_cli.data.needs import DataNeeds, needs_of
from paws_cli.data.sampling.batch import Batch
from paws_cli.methods import create_method
from paws_cli.methods.base import encoder_of
from paws_cli.modules.label_queue import LabelQueue
from paws_cli.optim import StepSchedule, create_optimizer
from paws_cli.train.process_group import DistContext, resolve_device, wrap_model
from paws_cli.train.step import autocast_for, make_grad_scaler

TOTAL_STEPS = 10_000  # the schedule's and after_step's run length (the EMA momentum's position)
DATASET_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "imagefolder": 1000}
ONLINE, TARGET, MODEL = "online", "target", "model"  # the clocked forwards


def scaled_batch(settings: Settings, device: torch.device, in_chans: int, seed: int = 0) -> Batch:
    """Random PAWS views and supports with the recipe's (scaled) shapes, on the device (benchmarks/gpu_check
    reuses it; the benchmark itself builds any method's batch with ``synthetic_batch``)."""
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
    """The recipe with a smaller unlabelled batch, fewer images per support class (of the section the method's
    support batch comes from) and smaller views."""
    a, o = settings.augment, settings.optim
    update: dict[str, Any] = {
        "optim": o.model_copy(update={"batch_size": max(1, round(o.batch_size * batch_scale))}),
        "augment": a.model_copy(
            update={
                "large_size": max(8, round(a.large_size * size_scale)),
                "small_size": max(8, round(a.small_size * size_scale)),
            }
        ),
    }
    support = needs_of(settings).support
    sections = {"paws"} if "paws" in (settings.__pydantic_extra__ or {}) else set()
    if support is not None:
        sections.add(support.section)
    for name in sections:
        section = settings.section(name)
        images = max(1, round(section.images_per_class * batch_scale))
        update[name] = section.model_copy(update={"images_per_class": images})
    return settings.model_copy(update=update)


def with_batch_size(settings: Settings, batch_size: int) -> Settings:
    return settings.model_copy(update={"optim": settings.optim.model_copy(update={"batch_size": batch_size})})


def view_sizes(settings: Settings, needs: DataNeeds) -> list[int]:
    """The size of each unlabelled view, in batch order (PAWS's default: 2 large, then augment.num_small small)."""
    if not needs.unlabelled_views:
        return []
    if needs.views is not None:
        return [spec.size for spec in needs.views]
    a = settings.augment
    return [a.large_size] * 2 + [a.small_size] * a.num_small


def batch_rows(settings: Settings, needs: DataNeeds) -> int:
    """Images of the unlabelled batch: optim.batch_size, plus a labelled sub-batch's when the method asks one."""
    sub = needs.labelled_sub_batch
    return settings.optim.batch_size + (sub.classes_per_batch * sub.images_per_class if sub else 0)


@dataclass
class LabelStream:
    """Labels, ids and true labels of the batch's images, drawn afresh for every step.

    The labelled pool holds ``per_class`` images of each of ``num_classes`` classes, image j having id j and
    label j % num_classes; unlabelled images have ids past the pool. The labelled sub-batch's rows (the last
    ones) are one pool image of each of K random classes, repeated P times with other images; ``share`` of the
    other rows are pool images too (labelled at the natural rate)."""

    rows: int
    sub_classes: int
    sub_images: int
    num_classes: int
    per_class: int
    share: float
    device: torch.device

    def __call__(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        gen = torch.Generator().manual_seed(10_007 + step)
        pool, c = self.num_classes * self.per_class, self.num_classes
        natural = self.rows - self.sub_classes * self.sub_images
        ids = pool + torch.randint(0, 10**7, (self.rows,), generator=gen)
        true = torch.randint(0, c, (self.rows,), generator=gen)
        labelled = torch.zeros(self.rows, dtype=torch.bool)
        labelled[torch.randperm(natural, generator=gen)[: round(self.share * natural)]] = True
        ids = torch.where(labelled, torch.randint(0, pool, (self.rows,), generator=gen), ids)
        if self.sub_classes:
            classes = torch.randperm(c, generator=gen)[: self.sub_classes].repeat(self.sub_images)
            nth = torch.randint(0, self.per_class, (classes.numel(),), generator=gen)
            ids[natural:] = nth * c + classes
            labelled[natural:] = True
        true = torch.where(labelled, ids % c, true)
        labels = torch.where(labelled, true, -1)
        return labels.to(self.device), ids.to(self.device), true.to(self.device)


def synthetic_batch(
    settings: Settings, needs: DataNeeds, device: torch.device, in_chans: int, seed: int = 0
) -> Batch:
    """Random inputs of the shapes ``needs`` asks for (labels, ids and true labels are set per step)."""
    gen = torch.Generator().manual_seed(seed)
    a = settings.augment

    def images(n: int, size: int) -> Tensor:
        x = torch.randn(n, in_chans, size, size, generator=gen).to(device)
        return x.contiguous(memory_format=torch.channels_last) if settings.model.channels_last else x

    rows = batch_rows(settings, needs)
    views = [images(rows, size) for size in view_sizes(settings, needs)]
    supports: list[Tensor] = []
    classes = torch.empty(0, dtype=torch.long, device=device)
    if needs.support is not None:
        k, p = needs.support.classes_per_batch, needs.support.images_per_class
        supports = [images(k * p, a.large_size) for _ in range(a.support_views)]
        classes = torch.arange(k).repeat(p).to(device)
    return Batch(views, supports, classes)


def fill_queues(method: Any, num_classes: int, per_class: int, seed: int = 1) -> list[LabelQueue]:
    """Fill every label queue the method keeps, all slots, with random unit vectors of pool images (each label
    and id on about size / pool slots, as in a run's steady state); returns the queues."""
    queues = [q for q in vars(method).values() if isinstance(q, LabelQueue)]
    gen = torch.Generator().manual_seed(seed)
    for queue in queues:
        n = queue.size
        ids = torch.arange(n) % (num_classes * per_class)
        vectors = torch.randn(queue.num_queues, n, queue.dim, generator=gen)
        queue.enqueue(vectors.to(queue.device), (ids % num_classes).to(queue.device), ids.to(queue.device))
    return queues


@dataclass
class Clocks:
    """Seconds and images of the forwards of named modules, recorded by hooks while ``on``."""

    clock: Any
    on: bool = False
    started: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    pixels: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.seconds = {ONLINE: 0.0, TARGET: 0.0, MODEL: 0.0}
        self.images = {ONLINE: 0, TARGET: 0, MODEL: 0}
        self.pixels = {ONLINE: 0, TARGET: 0, MODEL: 0}

    def watch(self, module: nn.Module, name: str) -> None:
        def before(_: nn.Module, args: tuple[Any, ...]) -> None:
            if self.on:
                self.started[name] = self.clock()

        def after(_: nn.Module, args: tuple[Any, ...], __: Any) -> None:
            if not self.on:
                return
            self.seconds[name] += self.clock() - self.started[name]
            views = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            self.images[name] += sum(v.shape[0] for v in views)
            self.pixels[name] += sum(v.shape[0] * v.shape[-1] * v.shape[-2] for v in views)

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)


class Bench:
    """One recipe's training step and its bare network, on random inputs of the method's shapes."""

    def __init__(self, recipe: str, settings: Settings, device: torch.device, args: argparse.Namespace):
        self.recipe, self.settings, self.device = recipe, settings, device
        run = settings.run
        self.precision = run.precision
        self.in_chans = args.in_chans or (1 if settings.data.dataset == "fashion_mnist" else 3)
        self.needs = needs = needs_of(settings)
        shapes = [s for s in (needs.support, needs.labelled_sub_batch) if s is not None]
        self.num_classes = max(
            [args.num_classes or DATASET_CLASSES.get(settings.data.dataset, 10)]
            + [s.classes_per_batch for s in shapes]
        )
        self.per_class = settings.data.labels_per_class or 10
        torch.manual_seed(0)
        self.method = create_method(settings, in_chans=self.in_chans, num_classes=self.num_classes)
        model = self.method.build_model().to(device)
        if settings.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = wrap_model(model, DistContext(1, 0, 0, device), settings.model)
        self.model.train()
        self.optimizer = create_optimizer(self.model, settings.optim)
        self.schedule = StepSchedule(
            self.optimizer, settings.optim, total_steps=TOTAL_STEPS, steps_per_epoch=100
        )
        self.scaler = make_grad_scaler(device, run.precision)
        self.batch = synthetic_batch(settings, needs, device, self.in_chans)
        self.rows = batch_rows(settings, needs)
        self.labels = None
        if needs.labels_in_batch:
            sub = needs.labelled_sub_batch
            share = args.labelled_share if args.labelled_share is not None else (0.0 if sub else 0.1)
            self.labels = LabelStream(
                self.rows,
                sub.classes_per_batch if sub else 0,
                sub.images_per_class if sub else 0,
                self.num_classes,
                self.per_class,
                share,
                device,
            )
            self.set_labels(0)
        self.queues = fill_queues(self.method, self.num_classes, self.per_class)
        self.inputs = self.batch.supports + self.batch.views  # what the trained network sees
        self.clocks = Clocks(self.clock)
        self.clocks.reset()
        inner = getattr(self.model, "module", self.model)
        self.clocks.watch(encoder_of(self.model), ONLINE)
        self.clocks.watch(self.model, MODEL)  # the online network of a model that calls only its backbone
        target = getattr(inner, "target", None)
        if isinstance(target, nn.Module):
            self.clocks.watch(target, TARGET)
        self.net_input: list[Tensor] | Tensor = self.inputs
        with torch.no_grad(), autocast_for(device, self.precision):
            try:
                outputs = self.outputs(self.model(self.net_input))
            except (AttributeError, TypeError):  # a model of one tensor (supervised): the views concatenated
                self.net_input = torch.cat(self.inputs)
                outputs = self.outputs(self.model(self.net_input))
        gen = torch.Generator().manual_seed(1)
        self.out_grads = [torch.randn(t.shape, generator=gen).to(device, t.dtype) for t in outputs]
        self.full_parts: list[dict[str, float]] = []
        self.net_parts: list[dict[str, float]] = []
        self.step_images, self.step_pixels = {ONLINE: 0, TARGET: 0}, {ONLINE: 0, TARGET: 0}

    @staticmethod
    def outputs(out: tuple[Tensor, ...] | Tensor) -> list[Tensor]:
        out = (out,) if isinstance(out, Tensor) else out
        return list({id(t): t for t in out}.values())  # without a prediction head z is h: one output

    def clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def set_labels(self, step: int) -> None:
        if self.labels is not None:
            self.batch.labels, self.batch.ids, self.batch.true_labels = self.labels(step)

    @property
    def method_name(self) -> str:
        return self.settings.method

    def full_step(self, step: int) -> dict[str, float]:
        """Seconds of each phase of the loop's step."""
        self.set_labels(step)
        self.clocks.reset()
        self.clocks.on = True
        t0 = self.clock()
        self.schedule.set(step)
        with autocast_for(self.device, self.precision):
            loss, _ = self.method.loss(self.model, self.batch)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} in the benchmark ({self.recipe})")
        t1 = self.clock()
        self.clocks.on = False
        self.optimizer.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        t2 = self.clock()
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        t3 = self.clock()
        self.method.after_step(self.model, step + 1, TOTAL_STEPS)
        t4 = self.clock()
        c = self.clocks
        online = ONLINE if c.images[ONLINE] else MODEL  # the encoder itself was not called: the whole model
        self.step_images = {ONLINE: c.images[online], TARGET: c.images[TARGET]}
        self.step_pixels = {ONLINE: c.pixels[online], TARGET: c.pixels[TARGET]}
        online, target = c.seconds[online], c.seconds[TARGET]
        return {
            "online": online,
            "target": target,
            "rest": t1 - t0 - online - target,
            "backward": t2 - t1,
            "optimiser": t3 - t2,
            "after_step": t4 - t3,
        }

    def network_only(self) -> dict[str, float]:
        """Seconds of the trained network's forward and backward alone."""
        t0 = self.clock()
        with autocast_for(self.device, self.precision):
            outputs = self.outputs(self.model(self.net_input))
        t1 = self.clock()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # the same multiplication of the output gradients as the scaled loss
            outputs = [self.scaler.scale(t) for t in outputs]
        torch.autograd.backward(outputs, self.out_grads)
        return {"online": t1 - t0, "backward": self.clock() - t1}

    def pair(self, step: int, timed: bool) -> None:
        a, b = self.full_step(step), self.network_only()
        if timed:
            self.full_parts.append(a)
            self.net_parts.append(b)

    # ------------------------------------------------------------------------------------------------ figures

    def median_ms(self, parts: list[dict[str, float]], key: str | None = None) -> float:
        return 1000 * statistics.median(sum(p.values()) if key is None else p[key] for p in parts)

    @property
    def full_ms(self) -> float:
        return self.median_ms(self.full_parts)

    @property
    def net_ms(self) -> float:
        return self.median_ms(self.net_parts)

    def shapes(self) -> str:
        """e.g. '64 x (2x28 + 4x16) + 10x8x1 supports'."""
        groups: list[list[int]] = []
        for size in view_sizes(self.settings, self.needs):
            if groups and groups[-1][1] == size:
                groups[-1][0] += 1
            else:
                groups.append([1, size])
        text = f"{self.rows} x ({' + '.join(f'{n}x{s}' for n, s in groups)})" if groups else ""
        sub = self.needs.labelled_sub_batch
        if sub is not None:
            text += f" ({sub.classes_per_batch * sub.images_per_class} of them a labelled sub-batch)"
        sup = self.needs.support
        if sup is not None:
            views = self.settings.augment.support_views
            text += f"{' + ' if text else ''}{sup.classes_per_batch}x{sup.images_per_class}x{views} supports"
        return text

    def images_text(self) -> str:
        fb, fwd = self.step_images[ONLINE], self.step_images[TARGET]
        kpx = self.step_pixels[ONLINE] / 1000, self.step_pixels[TARGET] / 1000
        return f"{fb} + {fwd} ({kpx[0]:.0f}k + {kpx[1]:.0f}k px)"

    def phase_text(self) -> str:
        full, net = self.full_parts, self.net_parts
        md = self.median_ms
        text = (
            f"{self.recipe} overhead by phase (median a - median b): online forward "
            f"{md(full, 'online') - md(net, 'online'):+.2f} ms"
        )
        if self.step_images[TARGET]:
            target = md(full, "target")
            text += (
                f", target forward (no grad, {self.step_images[TARGET]} images) {target:.2f} ms "
                f"(= {target / self.net_ms:.2f} x b)"
            )
        text += (
            f", the rest of method.loss (loss, health signals{', k-NN, positives' if self.queues else ''}) "
            f"{md(full, 'rest'):.2f} ms, backward {md(full, 'backward') - md(net, 'backward'):+.2f} ms, "
            f"optimiser step {md(full, 'optimiser'):.2f} ms, after_step {md(full, 'after_step'):.2f} ms"
        )
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fmnist_demo")
    parser.add_argument(
        "--compare-recipe",
        default=None,
        metavar="NAME",
        help="a second recipe timed in the same run at equal images per step (e.g. semppl_fmnist_demo)",
    )
    parser.add_argument(
        "--match",
        choices=("online", "all", "none"),
        default="online",
        help="equal images per step: through forward+backward (online), also counting a target network's "
        "forward-only images (all), or the recipes' own batch sizes (none)",
    )
    parser.add_argument(
        "--pairs",
        "--steps",
        dest="steps",
        type=int,
        default=200,
        help="timed (a, b) pairs per recipe (with 60 the median ratio of the demo recipe moved by +-0.013 "
        "between runs)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed pairs first (compilation, caches)")
    parser.add_argument("--batch-scale", type=float, default=1.0)
    parser.add_argument("--size-scale", type=float, default=1.0)
    parser.add_argument("--in-chans", type=int, default=None, help="default: 1 for fashion_mnist, else 3")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="default: the dataset's (10 or 1000 for imagefolder)"
    )
    parser.add_argument(
        "--labelled-share",
        type=float,
        default=None,
        help="share of the unlabelled batch's images that carry a label, for methods with labels in the batch "
        "(default: 0 with a labelled sub-batch, else 0.1)",
    )
    parser.add_argument("overrides", nargs="*", help="k=v settings, applied to every recipe")
    args = parser.parse_args()

    def settings_of(recipe: str) -> Settings:
        return scale_settings(load_settings(recipe, args.overrides), args.batch_scale, args.size_scale)

    settings = settings_of(args.recipe)
    run = settings.run
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    device = resolve_device(run.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as the training loop does

    benches = [Bench(args.recipe, settings, device, args)]
    if args.compare_recipe:
        benches.append(
            matched_bench(args.compare_recipe, settings_of(args.compare_recipe), benches[0], device, args)
        )
    for i in range(args.warmup + args.steps):
        # the recipes take turns going first, so that neither always follows the other's step
        for bench in benches if i % 2 == 0 else benches[::-1]:
            bench.pair(i, timed=i >= args.warmup)
    report(benches, device, args)


def matched_bench(
    recipe: str, settings: Settings, reference: Bench, device: torch.device, args: argparse.Namespace
) -> Bench:
    """The recipe's bench with optim.batch_size set for as many images per step as the reference's step."""
    bench = Bench(recipe, settings, device, args)
    if args.match == "none":
        return bench
    for b in (reference, bench):  # one untimed step each: the images each network sees
        if not b.step_images[ONLINE]:
            b.pair(0, timed=False)

    def counted(b: Bench) -> int:
        return b.step_images[ONLINE] + (b.step_images[TARGET] if args.match == "all" else 0)

    fixed = sum(s.shape[0] for s in bench.batch.supports)  # images that do not grow with the batch
    per_row = (counted(bench) - fixed) / bench.rows
    extra_rows = bench.rows - settings.optim.batch_size  # a labelled sub-batch
    batch_size = max(1, round((counted(reference) - fixed) / per_row) - extra_rows)
    if batch_size == settings.optim.batch_size:
        return bench
    del bench
    bench = Bench(recipe, with_batch_size(settings, batch_size), device, args)
    bench.pair(0, timed=False)
    return bench


def report(benches: list[Bench], device: torch.device, args: argparse.Namespace) -> None:
    s = benches[0].settings
    table = Table(
        title=f"Method step vs its network alone ({s.model.backbone}, {device}, {torch.get_num_threads()} threads, "
        f"{s.run.precision}{', channels_last' if s.model.channels_last else ''}"
        f"{', compiled backbone' if s.model.compile else ''})"
    )
    columns = (
        "recipe (method)",
        "inputs per step",
        "images f+b + forward-only",
        "(a) full step ms",
        "(b) network f+b ms",
        "a/b",
    )
    for col in columns:
        table.add_column(col, justify="right")
    for b in benches:
        table.add_row(
            f"{b.recipe} ({b.method_name})",
            b.shapes(),
            b.images_text(),
            f"{b.full_ms:.1f}",
            f"{b.net_ms:.1f}",
            f"{b.full_ms / b.net_ms:.3f}",
        )
    Console(width=180).print(table)
    for b in benches:
        full_s = [sum(p.values()) for p in b.full_parts]
        net_s = [sum(p.values()) for p in b.net_parts]
        print(
            f"{b.recipe}: medians of {args.steps} alternated pairs; means {1000 * statistics.mean(full_s):.1f} / "
            f"{1000 * statistics.mean(net_s):.1f} ms; a/b = {b.full_ms / b.net_ms:.3f}"
        )
        print(b.phase_text())
    if len(benches) == 2:
        first, second = benches
        print(comparison(first, second, args.match))


def comparison(first: Bench, second: Bench, match: str) -> str:
    def per_image(b: Bench, forward_only: bool) -> float:
        return b.full_ms / (b.step_images[ONLINE] + (b.step_images[TARGET] if forward_only else 0))

    name = f"{second.method_name} / {first.method_name}"
    return "\n".join(
        [
            f"comparison at {'the recipes own batch sizes' if match == 'none' else 'equal images per step'} "
            f"(--match {match}; images f+b + forward-only):",
            *(
                f"  {b.recipe} ({b.method_name}): {b.step_images[ONLINE]} + {b.step_images[TARGET]} images "
                f"per step, optim.batch_size {b.settings.optim.batch_size}, step {b.full_ms:.1f} ms"
                for b in (first, second)
            ),
            f"  step ratio {name}: {second.full_ms / first.full_ms:.3f} (network f+b alone: "
            f"{second.net_ms / first.net_ms:.3f}); issue 12's target for semppl / paws: at most 1.2",
            f"  per image ratio {name}: {per_image(second, False) / per_image(first, False):.3f} per image "
            f"through forward+backward, {per_image(second, True) / per_image(first, True):.3f} per image "
            "counting the forward-only ones",
        ]
    )


if __name__ == "__main__":
    main()
