"""The plan of `paws reproduce table1|table2|semppl`: every `paws` command, in order, with its result file and cost.

Steps (each a `paws` command line; a step is finished when its result file is there and valid, see status.py):

1. ``convert``   ``paws convert-dataset imagefolder IMAGENET/train WORK/data/train.beton`` (FFCV back end only;
   evaluation and fine-tuning read the JPEG folders, so the validation images are not converted);
2. ``splits``    ``paws make-splits DATASET WORK/splits/1pct --official 1% --val`` (and 10%): the official
   labelled list and the held-out ``val.txt``, checked against the dataset;
3. ``pretrain``  ``paws pretrain --recipe r50_1pct optim.epochs=100 ...`` for every (recipe, epochs) of the table
   (SemPPL: ``--recipe semppl_r50_1pct optim.epochs=300``; a cell the toolkit cannot reproduce gets no step);
4. ``knn``       ``paws knn-eval RUN/checkpoint.pt ...``: PAWS-NN on the validation images (Table 1 only);
5. ``finetune``  ``paws finetune RUN/checkpoint.pt ...``: the SimCLRv2 protocol, selected on val.txt.

Layout under WORK: ``data/``, ``splits/<1pct|10pct>/``, ``runs/<recipe>_e<epochs>[_finetune]/``, ``logs/``.

``scale="smoke"`` builds the very same steps on a tiny generated ImageNet-layout folder (smoke_data.py) with
small overrides (SMOKE_* below): the small CNN cnn_w16 at 32 px, epochs scaled by SMOKE_EPOCH_SCALE (the
100/200/300-epoch rows keep their ratios), a quarter of a fine-tuning epoch, on the CPU; SMOKE_METHOD adds the
method's own (PAWS's support batch, SemPPL's queue length).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from paws_cli.config import load_settings
from paws_cli.reproduce import estimate
from paws_cli.reproduce.paper import Cell, table_cells

Scale = Literal["full", "smoke"]
DataFormat = Literal["ffcv", "folder"]
StepKind = Literal["convert", "splits", "pretrain", "knn", "finetune"]

#: Smoke runs scale every epoch count by this: the 100/200/300-epoch rows become 0.1/0.2/0.3 epochs.
SMOKE_EPOCH_SCALE = 1 / 1000
#: Smoke settings for every pretraining run (one CPU process, a small network at 32 px).
SMOKE_PRETRAIN: tuple[str, ...] = (
    "world_size=1",
    "model.backbone=cnn_w16",  # resnet18 works too, but its checkpoints make the smoke run 5x slower
    "model.proj_hidden_dim=128",
    "model.proj_out_dim=128",
    "model.pred_hidden_dim=32",
    "model.channels_last=false",
    "augment.large_size=32",
    "augment.small_size=16",
    "augment.num_small=2",
    "optim.batch_size=16",
    "run.device=cpu",
    "run.precision=fp32",
    "run.log_every=1",
    "data.num_workers=0",  # tiny JPEGs decode faster in-process than worker processes start
)
#: Smoke settings of each method's own section, after SMOKE_PRETRAIN.
SMOKE_METHOD: dict[str, tuple[str, ...]] = {
    "paws": ("paws.classes_per_batch=4", "paws.images_per_class=2"),
    # A few hundred slots: the smoke folder's 1% list holds about 50 labelled images, seen ~3 times per epoch.
    "semppl": ("semppl.queue_size=256",),
}
#: Smoke settings for every evaluation (knn-eval and fine-tuning).
SMOKE_EVAL: tuple[str, ...] = (
    "run.device=cpu",
    "run.precision=fp32",
    "eval.batch_size=64",
    "data.num_workers=0",
)
#: A quarter of a fine-tuning epoch: 8 steps on the 10% list, 1 on the 1% list, then selection and test.
SMOKE_FINETUNE: tuple[str, ...] = ("finetune.epochs=0.25", "finetune.batch_size=16")
#: Settings of every step at both scales: logs, not progress bars, since steps write into log files.
COMMON: tuple[str, ...] = ("run.progress=false",)


@dataclass(frozen=True)
class Step:
    """One `paws` command of the plan.

    result: the file whose presence (checked by status.py) means the step is finished; run_dir: the run
    directory of pretrain/finetune steps (the runner adds --resume / --overwrite for a half-finished one);
    parallel: a multi-process step at full scale (run under the launcher); gpu_hours: the V100-hour estimate.
    """

    id: str
    kind: StepKind
    argv: tuple[str, ...]
    result: Path
    what: str
    needs: tuple[str, ...] = ()
    run_dir: Path | None = None
    parallel: bool = False
    gpu_hours: float = 0.0
    source: Path | None = None  # convert: the folder converted (status.py checks the .beton against it)

    def command(self) -> str:
        """The shell command line (what a user would type)."""
        return shlex.join(("paws", *self.argv))


@dataclass(frozen=True)
class PlannedCell:
    """A published number, the step that produces ours and where it is read from (None for both when the
    toolkit cannot reproduce the cell: ``cell.unavailable`` says why)."""

    cell: Cell
    step: str | None
    result: Path | None
    key: str  # key of the top-1 % value in the result JSON


@dataclass(frozen=True)
class PlanOptions:
    """What `paws reproduce` was asked for."""

    table: str
    scale: Scale
    imagenet: Path | None  # None only for a dry run at full scale (the plan shows <IMAGENET>)
    work: Path
    out: Path
    data_format: DataFormat
    overrides: tuple[str, ...] = ()  # --set: every pretrain, knn-eval and finetune step
    pretrain_overrides: tuple[str, ...] = ()  # --pretrain-set: pretraining only (e.g. run.launcher=slurm)


@dataclass
class Plan:
    """The ordered steps and the table cells they fill."""

    options: PlanOptions
    steps: list[Step]
    cells: list[PlannedCell]
    notes: list[str] = field(default_factory=list)

    def step(self, step_id: str) -> Step:
        """The step called ``step_id``."""
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    @property
    def gpu_hours(self) -> float:
        """The plan's total V100-hour estimate (full scale)."""
        return sum(s.gpu_hours for s in self.steps)

    @property
    def logs(self) -> Path:
        """Folder of the steps' log files."""
        return self.options.work / "logs"


def _fraction_dir(fraction: str) -> str:
    return f"{fraction.rstrip('%')}pct"


def _epochs_value(epochs: float) -> str:
    """An epoch count as an override value: integers without '.0', fractions as they are."""
    return str(int(epochs)) if float(epochs).is_integer() else repr(float(epochs))


@dataclass(frozen=True)
class _Layout:
    """Where a plan's inputs and outputs are, shared by its step builders."""

    options: PlanOptions
    train: Path
    val: Path
    dataset: Path  # what pretraining reads: the .beton or the train folder
    needs_data: tuple[str, ...]  # the step that makes ``dataset``, if any
    runs: Path
    split_dirs: dict[str, Path]

    @property
    def smoke(self) -> bool:
        return self.options.scale == "smoke"


def build_plan(options: PlanOptions) -> Plan:
    """Every step of ``options.table`` at ``options.scale`` (see the module doc), in an order that runs."""
    cells = table_cells(options.table)
    imagenet = options.imagenet if options.imagenet is not None else Path("<IMAGENET>")
    train, val = imagenet / "train", imagenet / "val"
    steps, notes = _conversion_steps(options, train)  # 1. conversion (FFCV only)
    dataset, needs_data = (steps[0].result, ("convert-train",)) if steps else (train, ())
    runnable = [c for c in cells if not c.unavailable]
    fractions = sorted({c.fraction for c in runnable}, key=lambda f: float(f.rstrip("%")))
    split_dirs = {f: options.work / "splits" / _fraction_dir(f) for f in fractions}
    layout = _Layout(options, train, val, dataset, needs_data, options.work / "runs", split_dirs)
    steps += [_split_step(layout, fraction) for fraction in fractions]  # 2. official splits
    # 3-5. pretraining and evaluation, one pretraining run per (recipe, epochs)
    metrics_by_run: dict[str, set[str]] = {}
    for cell in runnable:
        metrics_by_run.setdefault(cell.run_name, set()).add(cell.metric)
    planned: list[PlannedCell] = []
    for cell in cells:
        if cell.unavailable:  # shown in the report with its reason; nothing to run
            planned.append(PlannedCell(cell, None, None, "test_top1"))
            continue
        name = cell.run_name
        if not any(step.id == f"pretrain-{name}" for step in steps):
            steps += _run_steps(layout, cell, metrics_by_run[name])
        if cell.metric == "paws_nn":
            planned.append(
                PlannedCell(cell, f"knn-{name}", layout.runs / name / "knn_eval.json", "paws_nn_top1")
            )
        else:
            ft_json = layout.runs / f"{name}_finetune" / "finetune.json"
            planned.append(PlannedCell(cell, f"finetune-{name}", ft_json, "test_top1"))
    if layout.smoke:
        notes.append(
            f"smoke scale: a tiny generated ImageNet-layout folder, cnn_w16 at 32 px on the CPU, epochs x "
            f"{SMOKE_EPOCH_SCALE:g}, a quarter of a fine-tuning epoch; its numbers check the pipeline and say nothing about "
            "the paper's"
        )
    return Plan(options, steps, planned, notes)


def _conversion_steps(options: PlanOptions, train: Path) -> tuple[list[Step], list[str]]:
    """The FFCV conversion of the train folder (none for data.format=folder), and the plan's notes."""
    if options.data_format != "ffcv":
        return [], [
            "data.format=folder: pretraining decodes the JPEGs with PIL in DataLoader workers (no conversion)"
        ]
    beton = options.work / "data" / "train.beton"
    step = Step(
        "convert-train",
        "convert",
        ("convert-dataset", "imagefolder", str(train), str(beton)),
        beton,
        f"convert {train} into an FFCV .beton with its sidecar index (CPU)",
        source=train,
    )
    return [step], []


def _split_step(layout: _Layout, fraction: str) -> Step:
    """The official labelled list of ``fraction`` and the held-out val.txt."""
    out = layout.split_dirs[fraction]
    argv = ["make-splits", str(layout.dataset), str(out), "--official", fraction, "--val"]
    if layout.smoke:  # the smoke folder holds a few of ImageNet's classes
        argv.append("--dataset-classes-only")
    return Step(
        f"splits-{_fraction_dir(fraction)}",
        "splits",
        tuple(argv),
        out / "labelled.txt",
        f"official {fraction} labelled list and the held-out val.txt, checked against {layout.dataset.name}",
        needs=layout.needs_data,
    )


def _run_steps(layout: _Layout, cell: Cell, metrics: set[str]) -> list[Step]:
    """Pretraining of ``cell``'s run, then its PAWS-NN and/or fine-tuning, as ``metrics`` ask."""
    options, smoke, runs = layout.options, layout.smoke, layout.runs
    name = cell.run_name
    run_dir = runs / name
    checkpoint = run_dir / "checkpoint.pt"
    split_dir = layout.split_dirs[cell.fraction]
    settings = load_settings(cell.recipe, ["data.path=<estimate>"], environ={})
    epochs = cell.epochs * SMOKE_EPOCH_SCALE if smoke else float(cell.epochs)
    warmup = settings.optim.warmup_epochs * (SMOKE_EPOCH_SCALE if smoke else 1.0)
    argv = [
        "pretrain",
        "--recipe",
        cell.recipe,
        f"data.format={options.data_format}",
        f"data.path={layout.dataset}",
        f"data.split={split_dir / 'labelled.txt'}",
        f"optim.epochs={_epochs_value(epochs)}",
        f"run.out_dir={runs}",
        f"run.name={name}",
        *COMMON,
    ]
    if smoke:
        argv += [f"optim.warmup_epochs={_epochs_value(warmup)}", *SMOKE_PRETRAIN]
        argv += SMOKE_METHOD.get(settings.method, ())
    argv += [*options.overrides, *options.pretrain_overrides]
    steps = [
        Step(
            f"pretrain-{name}",
            "pretrain",
            tuple(argv),
            checkpoint,
            f"pretrain {cell.architecture} ({cell.method}) for {cell.epochs} epochs with {cell.fraction} "
            f"labels (recipe {cell.recipe})",
            needs=(*layout.needs_data, f"splits-{_fraction_dir(cell.fraction)}"),
            run_dir=run_dir,
            parallel=not smoke,
            gpu_hours=0.0 if smoke else estimate.pretrain_hours(settings, cell.epochs),
        )
    ]
    eval_data = [
        "data.format=folder",
        f"data.path={layout.train}",
        f"data.val_path={layout.val}",
        *COMMON,
        *(SMOKE_EVAL if smoke else ()),
    ]
    if "paws_nn" in metrics:
        out = run_dir / "knn_eval.json"
        steps.append(
            Step(
                f"knn-{name}",
                "knn",
                ("knn-eval", str(checkpoint), "--output", str(out), *eval_data, *options.overrides),
                out,
                f"PAWS-NN of {name} on the validation images (bank: the {cell.fraction} list)",
                needs=(f"pretrain-{name}",),
                gpu_hours=0.0 if smoke else estimate.knn_eval_hours(settings, cell.fraction),
            )
        )
    if "finetune" in metrics:
        ft_dir = runs / f"{name}_finetune"
        argv = [
            "finetune",
            str(checkpoint),
            *eval_data,
            f"finetune.val_split={split_dir / 'val.txt'}",
            f"run.out_dir={runs}",
            f"run.name={name}_finetune",
            *(SMOKE_FINETUNE if smoke else ()),
            *options.overrides,
        ]
        steps.append(
            Step(
                f"finetune-{name}",
                "finetune",
                tuple(argv),
                ft_dir / "finetune.json",
                f"fine-tune {name} on the {cell.fraction} list, select the epoch on val.txt, test on "
                "the validation images",
                needs=(f"pretrain-{name}", f"splits-{_fraction_dir(cell.fraction)}"),
                run_dir=ft_dir,
                parallel=not smoke,
                gpu_hours=0.0 if smoke else estimate.finetune_hours(settings, cell.fraction),
            )
        )
    return steps
