"""The parts of benchmarks/gpu_check.py: rows, verdicts, the table, the argument parser and the JPEG folder (pure:
tests/test_gpu_check.py checks them on the CPU), then the step bench, the colour comparison and the SyncBN parity
run that the checks use (CUDA code that also runs on the CPU, where tests exercise its plumbing).

paws_cli is imported inside the functions: the script's no-CUDA exit must not wait for it (nor for timm).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

NO_CUDA_LINE = "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine"
NO_CUDA_EXIT = 2
#: Verdicts. ok / FAILED: a correctness check (FAILED also: the check raised); met / MISSED: a speed or memory
#: target (a miss is a finding, not a failure); info: a figure without a target; skipped: not run here.
OK, FAILED, MET, MISSED, INFO, SKIPPED = "ok", "FAILED", "met", "MISSED", "info", "skipped"
VERDICTS = (OK, FAILED, MET, MISSED, INFO, SKIPPED)
COLUMNS = ("check", "setting", "result", "target", "verdict")

#: Check 2's methods: measured by name through the method registry. A method in AUTO_STEP_METHODS joins by itself
#: once `paws_cli.method_registry.method_names()` lists it (SemPPL is being written; nothing else to change here).
STEP_METHODS: tuple[str, ...] = ("paws",)
AUTO_STEP_METHODS: tuple[str, ...] = ("semppl",)


@dataclass
class Row:
    """One line of the table; ``values`` holds the raw numbers for the JSON file."""

    check: str
    setting: str
    result: str
    target: str = ""
    verdict: str = INFO
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters (error messages can be pages long)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def failed_row(check: str, setting: str, exc: BaseException) -> Row:
    return Row(check, setting, f"FAILED: {type(exc).__name__}: {one_line(exc)}", "", FAILED)


def skipped_row(check: str, setting: str, reason: str) -> Row:
    return Row(check, setting, f"skipped: {reason}", "", SKIPPED)


def at_most(value: float, limit: float) -> str:
    """Verdict of a speed/memory figure whose target is an upper bound."""
    return MET if value <= limit else MISSED


def at_least(value: float, limit: float) -> str:
    return MET if value >= limit else MISSED


def agrees(error: float, tolerance: float) -> str:
    """Verdict of a correctness comparison: ok within the tolerance, else FAILED (NaN fails)."""
    return OK if error <= tolerance else FAILED


def guarded(check: str, fn: Callable[..., list[Row]], *args: Any, **kwargs: Any) -> list[Row]:
    """``fn``'s rows, or one FAILED row naming the exception: a failing check never hides the others."""
    try:
        rows = fn(*args, **kwargs)
    except Exception as exc:  # every failure becomes a row; the run goes on with the next check
        return [failed_row(check, "(the whole check)", exc)]
    if not rows:
        return [Row(check, "(the whole check)", "FAILED: the check returned no rows", "", FAILED)]
    return rows


def exit_code(rows: Iterable[Row]) -> int:
    """1 if any row FAILED, else 0 (missed speed targets do not fail the run)."""
    return 1 if any(r.verdict == FAILED for r in rows) else 0


def verdict_style(verdict: str) -> str:
    return {OK: "green", MET: "green", FAILED: "bold red", MISSED: "yellow", SKIPPED: "dim"}.get(verdict, "")


def build_table(rows: Sequence[Row], title: str) -> Any:
    """The rich table of ``rows`` (one table for the whole run)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), show_lines=True)
    for name in COLUMNS:
        table.add_column(name, overflow="fold")
    for r in rows:  # Text, not markup: error messages and paths hold brackets
        cells = [Text(c) for c in (r.check, r.setting, r.result, r.target)]
        table.add_row(*cells, Text(r.verdict, style=verdict_style(r.verdict)))
    return table


def rows_to_json(rows: Sequence[Row], meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "exit_code": exit_code(rows), "rows": [asdict(r) for r in rows]}


def write_json(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows_to_json(rows, meta), indent=2, default=str) + "\n")


def step_methods(registered: Iterable[str], requested: Sequence[str] | None = None) -> list[str]:
    """The methods check 2 measures: ``requested`` (--methods) as given, else STEP_METHODS plus every
    AUTO_STEP_METHODS entry that is registered."""
    if requested:
        return list(dict.fromkeys(requested))
    known = set(registered)
    return list(STEP_METHODS) + [m for m in AUTO_STEP_METHODS if m in known and m not in STEP_METHODS]


class Budget:
    """Wall-clock budget of the run: optional work (compiled steps, a second method) is skipped when short."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock, self.start = seconds, clock, clock()

    def used(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.seconds - self.used()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def wnid(label: int) -> str:
    """An ImageNet-style class folder name (n01440764, ...)."""
    return f"n{1440764 + 1000 * label:08d}"


def make_jpeg_folder(
    root: Path,
    *,
    classes: int = 10,
    per_class: int = 40,
    size: tuple[int, int] = (256, 192),
    quality: int = 90,
    seed: int = 0,
) -> Path:
    """Write an ImageNet-layout folder ``root/train/<wnid>/<wnid>_<i>.JPEG`` of synthetic photos; return the
    train folder. Each class has its own colour cast and shape; images are smooth colour fields with a shape and
    grain, about ``size`` (width, height) +-20%, every third one portrait, as ImageNet's. Only numpy and PIL."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    if classes < 1 or per_class < 1:
        raise ValueError(f"need at least one class and one image per class, got {classes} x {per_class}")
    rng = np.random.default_rng(seed)
    train = Path(root) / "train"
    for label in range(classes):
        folder = train / wnid(label)
        folder.mkdir(parents=True, exist_ok=True)
        cast = rng.uniform(0.55, 1.0, size=3)
        cast[label % 3] = 1.0
        for i in range(per_class):
            w, h = sorted((max(16, int(s * rng.uniform(0.8, 1.2))) for s in size), reverse=True)
            if i % 3 == 2:
                w, h = h, w
            coarse = (rng.uniform(20, 235, size=(4, 4, 3)) * cast).astype(np.uint8)
            image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
            draw = ImageDraw.Draw(image)
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            box = (x0, y0, x0 + int(rng.integers(w // 4, w // 2)), y0 + int(rng.integers(h // 4, h // 2)))
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            (draw.ellipse if label % 2 else draw.rectangle)(box, fill=fill)
            image = image.filter(ImageFilter.GaussianBlur(0.6))
            pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(h, w, 3))
            out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            out.save(folder / f"{wnid(label)}_{i + 1}.JPEG", format="JPEG", quality=quality)
    return train


def parse_args(argv: Sequence[str] | None = None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=description)
    p.add_argument("--quick", action="store_true", help="about a minute: fewer steps, settings and queries")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON to this file")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget in seconds; optional settings (compiled steps, extra methods) are skipped "
        "when it runs short (default: 450, --quick: 90)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods for check 2 (default: paws, plus semppl once it is registered)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated check numbers to run (1-6), e.g. --only 2,3 (default: all)",
    )
    p.add_argument(
        "--keep-data", type=Path, default=None, help="write the JPEGs and .beton here and keep them"
    )
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 90.0 if args.quick else 450.0
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.only:
        try:
            only = {int(c) for c in args.only.split(",") if c.strip()}
        except ValueError:
            p.error(f"--only takes check numbers 1-6, got {args.only!r}")
        if not only or not only <= set(range(1, 7)):
            p.error(f"--only takes check numbers 1-6, got {args.only!r}")
        args.only = sorted(only)
    else:
        args.only = list(range(1, 7))
    return args


# ------------------------------------------------------------------------------------------ the checks' machinery
def describe_batch(settings: Any) -> str:
    """The per-process batch of ``settings``'s method, e.g. 'B=64 x (2x224 + 6x96) + 15x7 supports'."""
    from collections import Counter

    from paws_cli.method_registry import method_class

    needs, a = method_class(settings.method).data_needs(settings), settings.augment
    specs = getattr(needs, "views", None)
    sizes = [a.large_size] * 2 + [a.small_size] * a.num_small if specs is None else [v.size for v in specs]
    views = " + ".join(f"{n}x{size}" for size, n in Counter(sizes).items())
    text = f"B={settings.optim.batch_size} x ({views})"
    for shape, what in (
        (needs.support, "supports"),
        (getattr(needs, "labelled_sub_batch", None), "labelled"),
    ):
        if shape is not None:
            text += f" + {shape.classes_per_batch}x{shape.images_per_class} {what}"
    return text + (", labels in batch" if needs.labels_in_batch else "")


def step_setting(precision: str, channels_last: bool, compiled: bool) -> str:
    scaler = " + GradScaler" if precision == "fp16" else ""
    return f"{precision}{scaler}, {'channels_last' if channels_last else 'NCHW'}, {'compiled' if compiled else 'eager'}"


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


class StepBench:
    """A method's training step as the loop runs it (checks 1 and 3; check 2 uses benchmarks/step.py's Bench,
    which also times the bare network): on the batches it is given, or on step.py's synthetic batch."""

    def __init__(self, settings: Any, device: torch.device, num_classes: int = 1000, batch: bool = True):
        from step import synthetic_batch

        from paws_cli.data.needs import needs_of
        from paws_cli.methods import create_method
        from paws_cli.optim import StepSchedule, create_optimizer
        from paws_cli.train.process_group import DistContext, wrap_model
        from paws_cli.train.step import make_grad_scaler

        torch.manual_seed(0)
        self.settings, self.device, self.precision = settings, device, settings.run.precision
        self.method = create_method(settings, in_chans=3, num_classes=num_classes)
        model = self.method.build_model().to(device)
        if settings.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = wrap_model(model, DistContext(1, 0, 0, device), settings.model)
        self.model.train()
        self.optimizer = create_optimizer(self.model, settings.optim)
        self.total = 10_000
        self.schedule = StepSchedule(
            self.optimizer, settings.optim, total_steps=self.total, steps_per_epoch=100
        )
        self.scaler = make_grad_scaler(device, self.precision)
        self.batch = synthetic_batch(settings, needs_of(settings), device, 3) if batch else None

    def full_step(self, step: int, batch: Any = None) -> None:
        from paws_cli.train.step import autocast_for, backward_and_step

        self.schedule.set(step)
        with autocast_for(self.device, self.precision):
            loss, _ = self.method.loss(self.model, batch if batch is not None else self.batch)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")
        backward_and_step(loss, self.optimizer, self.scaler)
        self.method.after_step(self.model, step + 1, self.total)


def peak_of_steps(settings: Any, device: torch.device) -> tuple[int | None, str | None]:
    """(peak bytes of training steps up to the first one after the optimiser's state exists, None), or (None, the
    OOM message). fp16's scaler skips the optimiser while its scale is too large: up to 6 steps are run."""
    free_memory()
    torch.cuda.reset_peak_memory_stats(device)
    bench, error = None, None
    try:
        bench = StepBench(settings, device)
        for i in range(6):
            had_state = bool(bench.optimizer.state)
            bench.full_step(i)
            if had_state:
                break
        torch.cuda.synchronize(device)
        if not had_state:
            raise RuntimeError("the optimiser never stepped in 6 steps (the loss scaler skipped them all)")
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        error = one_line(exc, 160)
    bench = None  # the model and its activations go before the next try
    peak = torch.cuda.max_memory_allocated(device)
    free_memory()
    return (None, error) if error else (peak, None)


@contextlib.contextmanager
def cpu_colour_draws() -> Iterator[None]:
    """The FFCV back end's colour parameters drawn on the CPU whatever the device, so that the CUDA path gets the
    very draws of the CPU path: each step's device generator (seeded per step) is shadowed by a CPU generator
    with the same seed. Reaches into the back end, as only a check should."""
    from unittest import mock

    from paws_cli.data.backends import ffcv_loader

    original = ffcv_loader.sample_colour_params
    shadows: dict[int, tuple[torch.Generator, torch.Generator]] = {}

    def drawn_on_cpu(n: int, spec: Any, generator: torch.Generator) -> Any:
        if generator.device.type != "cpu":
            if id(generator) not in shadows:  # the pair keeps the generator alive: ids are not reused
                shadows[id(generator)] = (generator, torch.Generator().manual_seed(generator.initial_seed()))
            generator = shadows[id(generator)][1]
        return original(n, spec, generator)

    with mock.patch.object(ffcv_loader, "sample_colour_params", drawn_on_cpu):
        yield


def batch_to_cpu(batch: Any) -> list[torch.Tensor]:
    return [t.detach().float().cpu() for t in batch.views + batch.supports] + [batch.support_classes.cpu()]


def colour_differences(first: list[list[torch.Tensor]], second: list[list[torch.Tensor]]) -> dict[str, Any]:
    """Per-channel mean |difference| of the views of two runs over the same steps, the worst view's, and
    whether the support classes agree (the last tensor of each step)."""
    total = torch.zeros(3, dtype=torch.float64)
    means = torch.zeros(2, 3, dtype=torch.float64)
    pixels, worst, views, classes_equal = 0, 0.0, 0, True
    for a_step, b_step in zip(first, second, strict=True):
        classes_equal &= torch.equal(a_step[-1], b_step[-1])
        for a, b in zip(a_step[:-1], b_step[:-1], strict=True):
            if a.shape != b.shape:
                raise ValueError(f"view shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
            diff = (a.double() - b.double()).abs()
            total += diff.sum(dim=(0, 2, 3))
            means += torch.stack([a.double().sum(dim=(0, 2, 3)), b.double().sum(dim=(0, 2, 3))])
            pixels += diff.numel() // 3
            worst = max(worst, float(diff.mean(dim=(1, 2, 3)).max()))
            views += a.shape[0]
    return {
        "per_channel": (total / pixels).tolist(),
        "worst_view": worst,
        "views": views,
        "classes_equal": classes_equal,
        "means": (means / pixels).tolist(),
    }


SYNC_B, SYNC_M, SYNC_K, SYNC_P = 8, 2, 3, 2  # per process: images, small views, support classes x images


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """True fp32 (Ampere+ GPUs otherwise run convs and matmuls in TF32): what a 1e-4 parity needs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def syncbn_step(rank: int, world: int, device: torch.device, train_mode: bool) -> dict[str, Any]:
    """One PAWS forward/loss/backward on rank's slice of the global batch (world=1: the whole of it)."""
    from paws_cli.config import load_settings
    from paws_cli.data.sampling.batch import Batch
    from paws_cli.methods import create_method
    from paws_cli.train.process_group import DistContext, wrap_model

    settings = load_settings(
        "fmnist_demo",
        [
            "model.backbone=cnn_w16",
            "model.proj_hidden_dim=32",
            "model.proj_out_dim=16",
            "model.pred_hidden_dim=8",
            "model.channels_last=false",
            f"paws.classes_per_batch={SYNC_K}",
            f"paws.images_per_class={SYNC_P}",
            "run.precision=fp32",
        ],
        environ={},
    )
    torch.manual_seed(0)
    method = create_method(settings, in_chans=1, num_classes=2 * SYNC_K)
    model = method.build_model().to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU's "no SyncBatchNorm" warning (CPU runs check the plumbing)
        model = wrap_model(model, DistContext(world, rank, rank, device), settings.model)
    model.train(train_mode)
    gen = torch.Generator().manual_seed(7)
    views = [torch.randn(2 * SYNC_B, 1, 16, 16, generator=gen) for _ in range(2)]
    views += [torch.randn(2 * SYNC_B, 1, 8, 8, generator=gen) for _ in range(SYNC_M)]
    supports = torch.randn(2 * SYNC_K * SYNC_P, 1, 16, 16, generator=gen)
    classes = torch.cat([torch.arange(r * SYNC_K, (r + 1) * SYNC_K).repeat(SYNC_P) for r in range(2)])
    rows, srows = slice(None), slice(None)
    if world > 1:  # each process its own images and its own support classes (unique classes per rank)
        rows = slice(rank * SYNC_B, (rank + 1) * SYNC_B)
        srows = slice(rank * SYNC_K * SYNC_P, (rank + 1) * SYNC_K * SYNC_P)
    batch = Batch(
        [v[rows].to(device) for v in views], [supports[srows].to(device)], classes[srows].to(device)
    )
    loss, _ = method.loss(model, batch)
    loss.backward()
    inner = getattr(model, "module", model)
    return {
        "loss": loss.item(),
        "grads": {n: p.grad.detach().double().cpu() for n, p in inner.named_parameters()},
        "syncbn": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()),
    }


def _syncbn_worker(rank: int, init_file: str, out_dir: str, backend: str, device_type: str) -> None:
    import torch.distributed as dist

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    extra = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2, **extra)
    try:
        with exact_fp32():
            result = syncbn_step(rank, 2, device, train_mode=device.type == "cuda")
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def syncbn_parity(backend: str = "nccl", device_type: str = "cuda") -> dict[str, Any]:
    """2 processes (SyncBatchNorm in training mode on CUDA) against 1 process on the global batch. On the CPU
    (gloo) BatchNorm runs in eval mode: only the plumbing is checked."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        args = (str(Path(tmp) / "init"), tmp, backend, device_type)
        mp.spawn(_syncbn_worker, args=args, nprocs=2, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    with exact_fp32():
        single = syncbn_step(0, 1, device, train_mode=device_type == "cuda")
    g0, g1, gs = ranks[0]["grads"], ranks[1]["grads"], single["grads"]
    overall = max(g.abs().max().item() for g in gs.values())
    errors = {
        k: (g0[k] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-4 * overall, 1e-30)
        for k, ref in gs.items()
    }
    return {
        "loss_diff": abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - single["loss"]),
        "max_rel_grad_diff": max(errors.values()),
        "worst": max(errors, key=errors.get),
        "ranks_equal": all(torch.equal(g0[k], g1[k]) for k in g0),
        "tensors": len(gs),
        "syncbn_layers": ranks[0]["syncbn"],
    }


def step_configs(quick: bool) -> list[tuple[str, bool, bool]]:
    """(precision, channels_last, compiled) of check 2, in run order: the recipe's setting first (always run),
    the other eager ones, then the compiled ones (each run only while the budget allows)."""
    if quick:
        return [("fp16", True, False)]
    eager = [("fp16", True, False), ("bf16", True, False), ("fp32", True, False), ("fp16", False, False)]
    return [*eager, ("fp16", True, True), ("bf16", True, True)]
