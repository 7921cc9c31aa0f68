"""GPU proof: every CUDA path of the toolkit in one short run, checked and printed as one table (issue 16).

    python benchmarks/gpu_check.py [--quick] [--out FILE.json] [--budget-s S] [--methods paws,semppl]
                                   [--only 1,3] [--keep-data DIR]          (or: make gpu-check)

At most 8 minutes on one GPU (--quick: about a minute); needs no dataset from outside. Without CUDA it prints one
line to stderr and exits 2. Checks (each one catches its own errors into a FAILED row):

1. FFCV on CUDA: writes a small ImageNet-style JPEG folder, converts it with the toolkit's converter and trains
   100 steps of r50_10pct (B=64, 10 classes x 7 supports) from it with data.ffcv_colour_ops=tensor on CUDA:
   views/s and the share of the step spent waiting for data. The first steps are compared view by view with
   the CPU path (ffcv_colour_ops=opencv) on the same crops and the same colour draws. Skipped without ffcv.
2. A step of each method (paws; semppl once registered, see STEP_METHODS in gpu_check_parts.py; a method's own
   <name>_r50_10pct recipe when there is one) in fp32, bf16 and fp16 + GradScaler, channels_last, eager and
   compiled, against the bare network's forward+backward on the same views (benchmarks/step.py's Bench, on
   CUDA; target <= 1.10x). Compiled settings run while the time budget allows.
3. Peak memory of PAWS training steps of resnet50x2 and resnet50x4 at their per-GPU recipe batch, once the
   optimiser state exists; on OOM, the largest batch that fits by halving.
4. 2-process NCCL SyncBatchNorm gradient parity with one process on the global batch (needs 2 GPUs).
5. PAWS-NN (benchmarks/knn_memory.py) and k-NN on a 131072 x 2048 bank on the GPU: time, peak memory, and
   agreement with the CPU.
6. FusedLars on CUDA for the ResNet-50 PAWS model: step time against timm's Lars, and parity with it.

Verdicts: ok/FAILED for correctness, met/MISSED for speed and memory targets, info, skipped. Exit code 1 if a
row FAILED, else 0 (a MISSED target is a finding, not a failure). paws_cli, timm and ffcv are imported inside the
checks: the no-CUDA exit comes at once, and a broken import fails its own check only.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gpu_check_parts import (
    FAILED,
    MISSED,
    NO_CUDA_EXIT,
    NO_CUDA_LINE,
    OK,
    SYNC_B,
    SYNC_K,
    SYNC_P,
    Budget,
    Row,
    StepBench,
    agrees,
    at_most,
    batch_to_cpu,
    build_table,
    clock,
    colour_differences,
    cpu_colour_draws,
    describe_batch,
    exit_code,
    failed_row,
    free_memory,
    guarded,
    make_jpeg_folder,
    one_line,
    parse_args,
    peak_of_steps,
    skipped_row,
    step_configs,
    step_methods,
    step_setting,
    syncbn_parity,
    write_json,
)

GIB = 2**30
STEP_RATIO_TARGET = 1.10
DATA_WAIT_TARGET = 0.10  # share of the training step spent waiting for the next batch
COLOUR_TOLERANCE = 0.02  # mean |difference| per channel, normalised units (one 8-bit level is ~0.017)
WORST_VIEW_TOLERANCE = 0.15  # mean |difference| of the worst single view (a garbled copy is ~1)
#: Device vs CPU (PAWS-NN) and FusedLars vs timm's Lars, relative: float32 summation orders give ~1e-5.
NUMERIC_TOLERANCE = 1e-3


@dataclass
class Context:
    device: torch.device
    quick: bool
    data_dir: Path
    budget: Budget
    methods: list[str] | None = None
    #: Appended to every recipe's overrides: small runs of the checks on the CPU (tests, development).
    overrides: list[str] = field(default_factory=list)
    say: Callable[[str], None] = print


def settings_for(recipe: str, ctx: Context, *overrides: str) -> Any:
    from paws_cli.config import load_settings

    # The ImageNet recipes read FFCV data, whose path must be given even where nothing is loaded.
    first = [f"run.device={ctx.device.type}", "data.path=unused.beton"]
    return load_settings(recipe, [*first, *overrides, *ctx.overrides], environ={})


# ------------------------------------------------------------------------------------------ 1. FFCV on CUDA
C1 = "1 FFCV on CUDA"


def ffcv_overrides(beton: Path, colour: str) -> list[str]:
    workers = min(8, os.cpu_count() or 1)
    return [
        "data.format=ffcv",
        f"data.path={beton}",
        "data.split=null",
        "data.labels_per_class=10",
        "paws.classes_per_batch=10",
        f"data.num_workers={workers}",
        f"data.ffcv_colour_ops={colour}",
    ]


def collect_batches(settings: Any, device: torch.device, steps: int) -> list[list[torch.Tensor]]:
    from loader import endless

    from paws_cli.data.sources import build_train_data

    stream = endless(build_train_data(settings, device=device))
    try:
        return [batch_to_cpu(next(stream)) for _ in range(steps)]
    finally:
        stream.close()


def check_ffcv(ctx: Context) -> list[Row]:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return [skipped_row(C1, "data.format=ffcv", "ffcv not installed")]
    from data_tools.convert_imagefolder import convert_imagefolder

    classes, per_class = 10, 40 if ctx.quick else 128
    beton = ctx.data_dir / "train.beton"
    start, what = time.perf_counter(), f"reused {beton} (--keep-data)"
    if not beton.exists():
        train = make_jpeg_folder(ctx.data_dir, classes=classes, per_class=per_class)
        convert_imagefolder(train, beton, max_resolution=512, progress=False, overwrite=True)
        what = (
            f"{classes} classes x {per_class} JPEGs, ~256x192 px -> .beton (paws convert-dataset imagefolder)"
        )
    made = Row(C1, what, f"{beton.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s")
    return [made, *guarded(C1, ffcv_on_device, ctx, beton)]


def ffcv_speed(stream: Any, bench: StepBench, views_per_step: int, quick: bool, shape: str) -> list[Row]:
    """Loading alone, then training steps fed by the loader: views/s and the share of waiting for data."""
    device, settings = bench.device, bench.settings
    alone_steps, train_steps = (10, 30) if quick else (30, 100)
    start = clock(device)
    for _ in range(alone_steps):
        next(stream)
        clock(device)
    alone = alone_steps * views_per_step / (clock(device) - start)
    for i in range(3):  # warm-up: cuDNN autotuning, the scaler's first steps
        bench.full_step(i, next(stream))
    waits, totals = [], []
    for i in range(3, 3 + train_steps):
        t0 = clock(device)
        batch = next(stream)
        t1 = clock(device)  # the batch is on the device, its colour ops done
        bench.full_step(i, batch)
        waits.append(t1 - t0)
        totals.append(clock(device) - t0)
    share, rate = sum(waits) / sum(totals), train_steps * views_per_step / sum(totals)
    layout = "channels_last" if settings.model.channels_last else "NCHW"
    return [
        Row(
            C1,
            f"loading alone to {device.type}: {shape}",
            f"{alone:,.0f} views/s ({views_per_step} views/step)",
            values={"views_per_s": alone},
        ),
        Row(
            C1,
            f"{train_steps} training steps ({settings.run.precision}, {layout}) on {shape} (the small set's "
            "epochs are short: each epoch start refills FFCV's pipeline)",
            f"{rate:,.0f} views/s; data wait {100 * share:.1f}% of step time; "
            f"median step {1000 * statistics.median(totals):.0f} ms",
            f"wait <= {100 * DATA_WAIT_TARGET:.0f}%",
            at_most(share, DATA_WAIT_TARGET),
            {"views_per_s": rate, "data_wait_share": share, "median_step_s": statistics.median(totals)},
        ),
    ]


def ffcv_on_device(ctx: Context, beton: Path) -> list[Row]:
    """The first steps' views (kept), loading and training speed on the device, then the CPU path on the same
    crops and colour draws, view by view."""
    from loader import endless

    from paws_cli.data.sources import build_train_data

    device, compare_steps = ctx.device, 2 if ctx.quick else 4
    settings = settings_for("r50_10pct", ctx, *ffcv_overrides(beton, "tensor"))
    data = build_train_data(settings, device=device)
    bench = StepBench(settings, device, num_classes=data.num_classes, batch=False)
    shape = f"r50_10pct {describe_batch(settings)}, {settings.data.num_workers} FFCV threads"
    stream = endless(data)
    try:
        with cpu_colour_draws():  # the first steps: the CPU path's colour draws, kept for the comparison
            on_device = [batch_to_cpu(next(stream)) for _ in range(compare_steps)]
        views_per_step = sum(t.shape[0] for t in on_device[0][:-1])
        rows = guarded(C1, ffcv_speed, stream, bench, views_per_step, ctx.quick, shape)
    finally:
        stream.close()
    del bench, data
    free_memory()

    def against_cpu() -> list[Row]:
        cpu_settings = settings_for("r50_10pct", ctx, *ffcv_overrides(beton, "opencv"), "run.device=cpu")
        reference = collect_batches(cpu_settings, torch.device("cpu"), compare_steps)
        d = colour_differences(on_device, reference)
        error = max(d["per_channel"])
        ok = error <= COLOUR_TOLERANCE and d["worst_view"] <= WORST_VIEW_TOLERANCE and d["classes_equal"]
        r, g, b = d["per_channel"]
        return [
            Row(
                C1,
                f"colour: tensor ops on {device.type} vs opencv on cpu, same crops and draws, "
                f"{compare_steps} steps ({d['views']} views)",
                f"mean |diff| R {r:.4f} G {g:.4f} B {b:.4f}; worst view {d['worst_view']:.3f}; channel means "
                f"{' '.join(f'{m:+.3f}' for m in d['means'][0])} vs "
                f"{' '.join(f'{m:+.3f}' for m in d['means'][1])}"
                + ("" if d["classes_equal"] else "; SUPPORT CLASSES DIFFER"),
                f"<= {COLOUR_TOLERANCE} per channel, worst view <= {WORST_VIEW_TOLERANCE}",
                OK if ok else FAILED,
                d,
            )
        ]

    return rows + guarded(C1, against_cpu)


# ------------------------------------------------------------------------------------------ 2. method steps
def step_recipe(method: str) -> tuple[str, list[str]]:
    """The recipe check 2 times ``method`` with: its own ImageNet ResNet-50 recipe once there is one
    (``<method>_r50_10pct``), else r50_10pct with ``method=<method>``."""
    from paws_cli.config.loader import RECIPES_DIR

    own = f"{method}_r50_10pct"
    if method != "paws" and (RECIPES_DIR / f"{own}.yaml").is_file():
        return own, []
    return "r50_10pct", [f"method={method}"]


def time_step(recipe: str, settings: Any, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Median ms of the full step and of the bare network, timed alternately by benchmarks/step.py's Bench."""
    from types import SimpleNamespace

    from step import Bench

    args = SimpleNamespace(in_chans=3, num_classes=None, labelled_share=None)
    bench = Bench(recipe, settings, device, args)
    for i in range(warmup + steps):
        bench.pair(i, timed=i >= warmup)
    full_ms, net_ms = bench.full_ms, bench.net_ms
    return {"full_ms": full_ms, "net_ms": net_ms, "ratio": full_ms / net_ms, "shapes": bench.shapes()}


def check_steps(ctx: Context) -> list[Row]:
    from paws_cli.method_registry import method_names

    methods = step_methods(method_names(), ctx.methods)
    found: dict[str, list[Row]] = {name: [] for name in methods}
    steps, warmup = (8, 3) if ctx.quick else (20, 5)
    for k, (precision, channels_last, compiled) in enumerate(step_configs(ctx.quick)):
        for name in methods:  # every method's eager rows before any compiled one
            check, setting = f"2 step: {name}", step_setting(precision, channels_last, compiled)
            need = 180 if compiled else 30 if k else 0
            if not ctx.budget.allows(need):
                reason = f"time budget ({ctx.budget.left():.0f} s left, --budget-s)"
                found[name].append(skipped_row(check, setting, reason))
                continue
            ctx.say(f"check 2: {name} {setting}")
            try:
                recipe, chosen = step_recipe(name)
                s = settings_for(
                    recipe,
                    ctx,
                    *chosen,
                    f"run.precision={precision}",
                    f"model.channels_last={str(channels_last).lower()}",
                    f"model.compile={str(compiled).lower()}",
                )
                t = time_step(recipe, s, ctx.device, steps, warmup)
            except Exception as exc:  # one setting's failure is its own row
                found[name].append(failed_row(check, setting, exc))
                continue
            finally:
                free_memory()
            setting = step_setting(s.run.precision, s.model.channels_last, s.model.compile)  # as resolved
            found[name].append(
                Row(
                    check,
                    f"{setting}; {recipe}, {s.model.backbone}, {t['shapes']}",
                    f"step {t['full_ms']:.1f} ms, network f+b {t['net_ms']:.1f} ms: {t['ratio']:.3f}x",
                    f"<= {STEP_RATIO_TARGET:.2f}x",
                    at_most(t["ratio"], STEP_RATIO_TARGET),
                    t,
                )
            )
    return [row for name in methods for row in found[name]]


# ------------------------------------------------------------------------------------------ 3. wide models' memory
def check_wide_memory(ctx: Context) -> list[Row]:
    from step import scale_settings

    total = torch.cuda.get_device_properties(ctx.device).total_memory
    rows = []
    for recipe in ("r50x4_10pct",) if ctx.quick else ("r50x2_10pct", "r50x4_10pct"):
        base = settings_for(recipe, ctx)
        check, setting = f"3 memory: {base.model.backbone}", f"{recipe} per GPU: {describe_batch(base)}, "
        setting += f"{base.run.precision}, channels_last, steps with the optimiser state"
        ctx.say(f"check 3: {recipe}")
        try:
            scale, first_error = 1.0, None
            while True:
                s = scale_settings(base, scale, 1.0)
                peak, error = peak_of_steps(s, ctx.device)
                if error is None:
                    break
                first_error = first_error or error
                if s.optim.batch_size == 1 and s.paws.images_per_class == 1:
                    break
                scale /= 2
        except Exception as exc:
            rows.append(failed_row(check, setting, exc))
            continue
        values = {"peak_bytes": peak, "device_bytes": total, "batch_size": s.optim.batch_size}
        if first_error is None:
            result = f"peak {peak / GIB:.1f} GiB of {total / GIB:.1f} GiB ({100 * peak / total:.0f}%)"
            rows.append(Row(check, setting, result, "fits at the recipe batch", OK, values))
        elif peak is None:
            rows.append(Row(check, setting, f"OOM even at B=1: {first_error}", "fits", FAILED, values))
        else:
            result = f"OOM at the recipe batch ({first_error}); largest that fit by halving: "
            result += f"{describe_batch(s)}, peak {peak / GIB:.1f} GiB"
            rows.append(Row(check, setting, result, "fits at the recipe batch", MISSED, values))
    return rows


# ------------------------------------------------------------------------------------------ 4. SyncBN parity
C4 = "4 SyncBN (NCCL)"
SYNC_TOLERANCE = 1e-4


def check_syncbn(ctx: Context) -> list[Row]:
    setting = f"2 processes x (B={SYNC_B}, {SYNC_K}x{SYNC_P} supports) vs 1 process x the global batch, fp32"
    if ctx.device.type != "cuda" or torch.cuda.device_count() < 2:
        return [skipped_row(C4, setting, f"{torch.cuda.device_count()} GPU")]
    p = syncbn_parity()
    error = max(p["max_rel_grad_diff"], p["loss_diff"])
    good = p["ranks_equal"] and p["syncbn_layers"] > 0
    result = (
        f"{p['syncbn_layers']} SyncBatchNorm layers; loss |diff| {p['loss_diff']:.1e}; gradients: max rel diff "
        f"{p['max_rel_grad_diff']:.1e} over {p['tensors']} tensors (worst {p['worst']}); "
        f"ranks {'equal' if p['ranks_equal'] else 'DIFFER'}"
    )
    verdict = agrees(error, SYNC_TOLERANCE) if good else FAILED
    return [Row(C4, setting, result, f"<= {SYNC_TOLERANCE:g}", verdict, p)]


# ------------------------------------------------------------------------------------------ 5. knn-eval
C5 = "5 knn-eval"


def check_knn(ctx: Context, bank: int = 131072, dim: int = 2048, classes: int = 1000) -> list[Row]:
    import knn_memory

    from paws_cli.eval.neighbours import DEFAULT_BLOCK_BYTES, knn_predict, soft_nn_predict

    queries, device = 10000 if ctx.quick else 50000, ctx.device
    setting = f"bank {bank} x {dim}, {queries} queries, {classes} classes"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sizes = {"--bank": bank, "--queries": queries, "--dim": dim, "--classes": classes}
        knn_memory.main(["--device", str(device), *(str(x) for kv in sizes.items() for x in kv)])
    text = out.getvalue()

    def number(pattern: str) -> float:
        match = re.search(pattern, text)
        if match is None:
            raise ValueError(f"benchmarks/knn_memory.py printed no {pattern!r}: {one_line(text)}")
        return float(match.group(1))

    wall = number(r"wall time ([\d.]+) s")
    on_cuda = device.type == "cuda"
    peak_mib = number(r"peak CUDA memory during soft_nn_predict (\d+)") if on_cuda else float("nan")
    row_err = number(r"max \|row sum - 1\| = (\S+)")
    inputs = (bank + queries) * dim * 4 + queries * classes * 4
    limit = inputs + 4 * DEFAULT_BLOCK_BYTES
    rows = [
        Row(
            C5,
            f"PAWS-NN soft_nn_predict (benchmarks/knn_memory.py), {setting}",
            f"{wall:.2f} s ({queries / wall:,.0f} queries/s), peak {peak_mib / 1024:.2f} GiB; "
            f"max |row sum - 1| {row_err:.1e}",
            f"peak <= inputs + output + 4 blocks ({limit / GIB:.2f} GiB)",
            at_most(peak_mib * 2**20, limit) if row_err < 1e-4 else FAILED,
            {"seconds": wall, "peak_bytes": peak_mib * 2**20, "row_sum_error": row_err},
        )
    ]
    gen = torch.Generator(device=device).manual_seed(0)
    embeddings = torch.randn(bank, dim, device=device, generator=gen)
    labels = torch.randint(0, classes, (bank,), device=device, generator=gen)
    q = torch.randn(queries, dim, device=device, generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = clock(device)
    scores = knn_predict(q, embeddings, labels, classes, k=20)
    seconds = clock(device) - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    finite = bool(torch.isfinite(scores).all())
    rows.append(
        Row(
            C5,
            f"k-NN knn_predict k=20, {setting}",
            f"{seconds:.2f} s ({queries / seconds:,.0f} queries/s), peak {peak / GIB:.2f} GiB"
            + ("" if finite else "; NON-FINITE scores"),
            "finite scores",
            OK if finite else FAILED,
            {"seconds": seconds, "peak_bytes": peak},
        )
    )
    del scores
    some = q[:256]
    on_device = soft_nn_predict(some, embeddings, labels, classes).cpu()
    on_cpu = soft_nn_predict(some.cpu(), embeddings.cpu(), labels.cpu(), classes)
    diff = (on_device - on_cpu).abs().max().item() / on_cpu.abs().max().item()
    rows.append(
        Row(
            C5,
            f"soft_nn_predict on {device.type} vs cpu, 256 queries, same bank",
            f"max |diff| {diff:.1e} of the largest probability",
            f"<= {NUMERIC_TOLERANCE:g}",
            agrees(diff, NUMERIC_TOLERANCE),
            {"rel_diff": diff},
        )
    )
    del embeddings, labels, q
    free_memory()
    return rows


# ------------------------------------------------------------------------------------------ 6. FusedLars
C6 = "6 FusedLars"


def check_fused_lars(ctx: Context, steps: int = 20) -> list[Row]:
    import copy

    from timm.optim import Lars

    from paws_cli.methods import create_method
    from paws_cli.optim import FusedLars, create_optimizer

    device, settings = ctx.device, settings_for("r50_10pct", ctx)
    torch.manual_seed(0)
    fused_model = create_method(settings, in_chans=3, num_classes=1000).build_model().to(device)
    fused = create_optimizer(fused_model, settings.optim)
    if not isinstance(fused, FusedLars):
        raise TypeError(f"create_optimizer made a {type(fused).__name__}, not FusedLars")
    ref_model = copy.deepcopy(fused_model)
    ref = Lars([dict(g) for g in create_optimizer(ref_model, settings.optim).param_groups])
    pairs = [(p, q) for p, q in zip(fused_model.parameters(), ref_model.parameters()) if p.requires_grad]
    start = [q.detach().clone() for _, q in pairs]
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(3):  # 3 steps, both on the same fresh gradients (the fused step consumes its copy)
        for p, q in pairs:
            grad = 1e-3 * torch.randn(p.shape, device=device, generator=gen)
            p.grad, q.grad = grad.clone(), grad.clone()
        fused.step()
        ref.step()
    moved = max((q.detach() - s).abs().max().item() for (_, q), s in zip(pairs, start))
    diff = max((p.detach() - q.detach()).abs().max().item() for p, q in pairs) / max(moved, 1e-30)
    grads = [p.grad.clone() for p, _ in pairs]

    def timed(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
        times = []
        for _ in range(3 + steps):
            for param, grad in zip(params, grads):
                param.grad.copy_(grad)
            t0 = clock(device)
            optimizer.step()
            times.append(clock(device) - t0)
        return 1000 * statistics.median(times[3:])

    fused_ms = timed(fused, [p for p, _ in pairs])
    ref_ms = timed(ref, [q for _, q in pairs])
    count = sum(p.numel() for p, _ in pairs)
    del fused_model, ref_model, fused, ref, pairs
    free_memory()
    setting = f"PAWS ResNet-50 model of r50_10pct ({count / 1e6:.1f}M parameters) on {device.type}"
    return [
        Row(
            C6,
            f"{setting}: step time",
            f"{fused_ms:.2f} ms (timm's Lars {ref_ms:.2f} ms: {ref_ms / fused_ms:.1f}x)",
            values={"fused_ms": fused_ms, "timm_ms": ref_ms, "parameters": count},
        ),
        Row(
            C6,
            f"{setting}: 3 steps vs timm's Lars",
            f"max |diff| {diff:.1e} of the largest update",
            f"<= {NUMERIC_TOLERANCE:g}",
            agrees(diff, NUMERIC_TOLERANCE),
            {"rel_diff": diff},
        ),
    ]


# ------------------------------------------------------------------------------------------ the run
CHECKS: dict[int, tuple[str, Callable[[Context], list[Row]]]] = {
    1: (C1, check_ffcv),
    2: ("2 step", check_steps),
    3: ("3 memory", check_wide_memory),
    4: (C4, check_syncbn),
    5: (C5, check_knn),
    6: (C6, check_fused_lars),
}
#: Run order: the step check last, as its compiled settings use whatever time the budget has left.
RUN_ORDER = (1, 3, 4, 5, 6, 2)


def run_checks(ctx: Context, only: list[int]) -> list[Row]:
    found: dict[int, list[Row]] = {}
    for number in (n for n in RUN_ORDER if n in only):
        name, fn = CHECKS[number]
        ctx.say(f"check {name} ({ctx.budget.used():.0f} s so far)")
        found[number] = guarded(name, fn, ctx)
        free_memory()
    return [row for number in sorted(found) for row in found[number]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__.splitlines()[0])
    if not torch.cuda.is_available():
        print(NO_CUDA_LINE, file=sys.stderr)
        return NO_CUDA_EXIT
    from rich.console import Console

    console = Console(width=200)
    budget = Budget(args.budget_s)
    with contextlib.ExitStack() as stack:
        if args.keep_data is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        else:
            data_dir = args.keep_data
            data_dir.mkdir(parents=True, exist_ok=True)
        device = torch.device("cuda", torch.cuda.current_device())
        say = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
        ctx = Context(device, args.quick, data_dir, budget, args.methods, say=say)
        rows = run_checks(ctx, args.only)
    name = torch.cuda.get_device_name(device)
    meta = {
        "device": name,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "quick": args.quick,
        "seconds": round(budget.used(), 1),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    title = (
        f"gpu_check{' --quick' if args.quick else ''}: {name} x{meta['gpus']}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), {meta['seconds']:.0f} s"
    )
    console.print(build_table(rows, title))
    if args.out is not None:
        write_json(args.out, rows, meta)
        console.print(f"wrote {args.out}")
    code = exit_code(rows)
    console.print(f"gpu_check: {'some check FAILED' if code else 'no check failed'} (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
