"""`paws reproduce table1|table2|semppl`: plan, (dry-)run and report a reproduction of the PAWS paper's Tables 1
and 2, or of SemPPL's ImageNet numbers (SEMPPL-SPEC section 11).

Full scale needs the ImageNet folder (``IMAGENET/train/<wnid>/*.JPEG`` and ``IMAGENET/val/<wnid>/*.JPEG``) and
GPUs; ``--dry-run`` prints every command with its state and V100-hour estimate and runs nothing. The smoke scale
generates a tiny ImageNet-layout folder and runs the same plan on the CPU in a few minutes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from paws_cli.reproduce.paper import table_cells
from paws_cli.reproduce.plan import DataFormat, Plan, PlanOptions, Scale, build_plan
from paws_cli.reproduce.report import report_paths, write_report
from paws_cli.reproduce.runner import InProcessExecutor, SubprocessExecutor, run_plan
from paws_cli.reproduce.status import step_status

#: Work folders (runs, converted data, splits, logs) when --work is not given.
DEFAULT_WORK = {"full": Path("runs/reproduce"), "smoke": Path("runs/reproduce_smoke")}
FFCV_INSTALL = (
    "install the ffcv extra (`make setup` as root, or `pip install -c constraints.txt -e '.[ffcv]'` after "
    "`apt-get install pkg-config g++ libturbojpeg0-dev libopencv-dev`)"
)


def ffcv_available() -> bool:
    """Whether the optional FFCV back end can be imported (checked without importing it: that is slow)."""
    return all(importlib.util.find_spec(name) is not None for name in ("ffcv", "numba"))


def choose_format(
    requested: Literal["auto", "ffcv", "folder"], scale: Scale, dry_run: bool
) -> tuple[DataFormat, str]:
    """The pretraining data format and a line saying why (printed with the plan)."""
    if requested == "folder":
        return "folder", "data.format=folder (asked for)"
    if ffcv_available():
        return "ffcv", "data.format=ffcv: ImageNet is converted once into an FFCV .beton"
    if requested == "ffcv" or (scale == "full" and not dry_run):
        raise ValueError(
            f"--format {requested} needs FFCV, which is not installed: {FFCV_INSTALL}; or pass --format folder "
            "to pretrain from the JPEG folder (slower data loading)"
        )
    return (
        "folder",
        f"data.format=folder, because FFCV is not installed (for the .beton pipeline, {FFCV_INSTALL})",
    )


def _check_imagenet(root: Path) -> None:
    for part in ("train", "val"):
        folder = root / part
        if not folder.is_dir():
            raise FileNotFoundError(
                f"--imagenet {root}: {folder} is not a folder. Give the ImageNet root holding train/<wnid>/*.JPEG "
                "and val/<wnid>/*.JPEG (the validation images sorted into class folders, as torchvision's "
                "ImageFolder reads them)"
            )


def plan_table(plan: Plan) -> Table:
    """The plan as a rich table: step, state, estimate, command."""
    full = plan.options.scale == "full"
    table = Table(
        title=f"paws reproduce {plan.options.table} ({plan.options.scale} scale): {len(plan.steps)} steps"
    )
    table.add_column("#", justify="right")
    table.add_column("step")
    table.add_column("state")
    if full:
        table.add_column("V100-h", justify="right")
    table.add_column("command")
    for index, step in enumerate(plan.steps, 1):
        try:
            status = step_status(step, plan)
            state = f"{status.state} {status.detail}".strip()
        except (ValueError, FileNotFoundError) as exc:
            state = f"blocked: {exc}"
        row = [str(index), step.id, escape(state)]
        if full:
            row.append(f"{step.gpu_hours:,.1f}" if step.gpu_hours else "CPU")
        table.add_row(*row, escape(step.command()))
    return table


def reproduce_command(
    table: str,
    *,
    imagenet: Path | None,
    scale: Scale,
    out: Path,
    work: Path | None,
    dry_run: bool,
    data_format: Literal["auto", "ffcv", "folder"],
    launcher: str | None,
    overrides: Sequence[str],
    pretrain_overrides: Sequence[str],
    console: Console,
    cli_app: Callable[..., object],
) -> int:
    """Build the plan; print it (dry run) or run it and write the report. Returns the exit status.

    ``cli_app`` is the `paws` Typer app, which runs the steps in this process at smoke scale.
    """
    table_cells(table)  # an unknown table fails before anything else
    if scale not in ("full", "smoke"):
        raise ValueError(f"--scale must be full or smoke, got {scale!r}")
    work = work or DEFAULT_WORK[scale]
    if scale == "smoke":
        if imagenet is not None:
            raise ValueError("--scale smoke generates its own tiny ImageNet folder; drop --imagenet")
        imagenet = work / "smoke_imagenet"
    elif imagenet is None:
        if not dry_run:
            raise ValueError(
                "give the ImageNet folder: --imagenet /path/to/imagenet (make: IMAGENET=/path/to/imagenet), "
                "holding train/<wnid>/ and val/<wnid>/; --dry-run shows the plan without it"
            )
    else:
        _check_imagenet(imagenet)
    fmt, why = choose_format(data_format, scale, dry_run)
    options = PlanOptions(
        table=table,
        scale=scale,
        imagenet=imagenet,
        work=work,
        out=out,
        data_format=fmt,
        overrides=tuple(overrides),
        pretrain_overrides=tuple(pretrain_overrides),
    )
    plan = build_plan(options)
    plan.notes.insert(0, why)
    if dry_run:
        _print_plan(plan, launcher, console)
        return 0
    if scale == "smoke":
        from paws_cli.reproduce.smoke_data import make_smoke_imagenet

        console.print(f"smoke data: {make_smoke_imagenet(imagenet)}", highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    executor = InProcessExecutor(cli_app) if scale == "smoke" else SubprocessExecutor(launcher)
    outcomes = run_plan(plan, executor, lambda line: console.print(line, highlight=False, markup=False))
    md, results = write_report(plan, outcomes)
    console.print(md.read_text(), markup=False, highlight=False)
    console.print(f"report: {md} (and {report_paths(plan)[1]})", highlight=False)
    failed = [o for o in outcomes if o.outcome == "failed"]
    if failed:
        console.print(
            f"[red]{len(failed)} step(s) failed[/]: "
            + "; ".join(f"{o.step} (log {o.log})" for o in failed)
            + ". Fix the cause and run the same command again: finished steps are skipped.",
            highlight=False,
        )
        return 1
    waiting = sum(o.outcome == "waiting" for o in outcomes)
    blocked = sum(o.outcome == "blocked" for o in outcomes)
    if waiting or blocked:
        console.print(
            f"{waiting} step(s) are not finished yet and {blocked} wait for them; run the same command again "
            "later (finished steps are skipped).",
            highlight=False,
        )
    filled = sum(r.ours is not None for r in results)
    console.print(f"our number is in {filled} of the {len(results)} cells of the table.", highlight=False)
    return 0


def _print_plan(plan: Plan, launcher: str | None, console: Console) -> None:
    console.print(plan_table(plan))
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    if plan.options.scale == "full":
        hours = plan.gpu_hours
        console.print(
            f"estimate: {hours:,.0f} V100-hours in all, about {hours / 64:,.0f} h on 64 V100 (anchored on the "
            "PAWS paper's 8.2 h for 100 ResNet-50 epochs on 64 V100; see paws_cli/reproduce/estimate.py)",
            highlight=False,
        )
        how = (
            f"under `{launcher}`"
            if launcher
            else "as single processes (give --launcher, e.g. 'torchrun --nproc_per_node 8')"
        )
        console.print(f"pretraining and fine-tuning steps run {how}", highlight=False, markup=False)
    for cell in plan.cells:
        if cell.cell.unavailable:
            what = (
                f"{cell.cell.method} {cell.cell.architecture} {cell.cell.fraction} ({cell.cell.paper_top1})"
            )
            console.print(f"not planned: {what}: {cell.cell.unavailable}", highlight=False, markup=False)
    md, _ = report_paths(plan)
    console.print(f"dry run: nothing was run; the report would be {md}", highlight=False)
