"""The `paws` command line. Commands are thin: they resolve settings and call the library.

Every user error (settings, data, checkpoints, run directories) prints one clear message and exits with code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from paws_cli import cli_convert
from paws_cli.config import (
    ConfigError,
    Settings,
    find_recipe,
    load_settings,
    settings_to_yaml,
)

app = typer.Typer(
    name="paws",
    help="PAWS semi-supervised pretraining and evaluation. Settings: --recipe NAME|PATH plus key=value overrides "
    "(see `paws settings`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipes_app = typer.Typer(help="List and show the named recipes in paws_cli/recipes/.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
console = Console(soft_wrap=True)  # long lines stay whole in logs and pipes
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

RecipeOption = Annotated[
    str | None,
    typer.Option(
        "--recipe",
        "-r",
        help="Recipe name in paws_cli/recipes/ or a YAML path (a run's resolved_config.yaml too).",
    ),
]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Dotted key=value overrides, e.g. optim.lr=0.3 run.name=try1.")
]


def user_errors(fn: F) -> F:
    """Turn the toolkit's user-facing errors into one red line and exit code 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from paws_cli.train.checkpoint_io import CheckpointError
        from paws_cli.train.guards import NonFiniteLossError, TrainingInterruptedError
        from paws_cli.train.rundir import RunDirError

        try:
            return fn(*args, **kwargs)
        except TrainingInterruptedError as exc:
            err_console.print(f"[bold yellow]stopped:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except (
            ConfigError,
            CheckpointError,
            RunDirError,
            NonFiniteLossError,
            ValueError,
            FileNotFoundError,
            NotADirectoryError,
        ) as exc:
            # Escaped: messages quote file names and commands with brackets (`pip install 'paws-cli[ffcv]'`).
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _settings(recipe: str | None, overrides: list[str] | None) -> Settings:
    return load_settings(recipe, overrides or [])


def _default_name(recipe: str | None, settings: Settings) -> str:
    stem = Path(recipe).stem if recipe else "run"
    if stem == "resolved_config" and recipe:
        stem = Path(recipe).parent.name
    return stem if settings.method == "paws" else f"{stem}_{settings.method}"


@app.command()
@user_errors
def pretrain(
    overrides: OverridesArg = None,
    recipe: RecipeOption = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in the run directory from its checkpoint.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Start again in an existing run directory.")] = False,
    print_config: Annotated[bool, typer.Option(help="Print the resolved settings as YAML and exit.")] = False,
) -> None:
    """Pretrain with the configured method (PAWS, or method=supervised for the labelled-only baseline)."""
    if recipe is None and not print_config:
        # The bare defaults are no run anyone planned (sizes for ImageNet, data for Fashion-MNIST): ask for one.
        from paws_cli.reproduce.recipe_table import listed_recipes

        raise ConfigError(
            "paws pretrain needs a recipe: pass --recipe NAME (one of "
            f"{', '.join(listed_recipes())}; `paws recipes ls` describes them) or --recipe FILE.yaml, plus "
            "key=value overrides; e.g. `paws pretrain --recipe fmnist_demo` pretrains on Fashion-MNIST on a CPU "
            "in minutes"
        )
    settings = _settings(recipe, overrides)
    if print_config:
        console.print(settings_to_yaml(settings), end="", highlight=False, markup=False)
        return
    if settings.run.launcher == "slurm":
        from paws_cli.launch.slurm import submit_pretrain

        submit_pretrain(
            settings,
            resume=resume,
            overwrite=overwrite,
            console=console,
            default_name=_default_name(recipe, settings),
        )
        return
    from paws_cli.train.loop import train

    result = train(
        settings,
        resume=resume,
        overwrite=overwrite,
        console=console,
        default_name=_default_name(recipe, settings),
    )
    if result.is_main and not result.already_complete:
        from paws_cli.train.banner import images_per_step

        kind = images_per_step(settings, result.world_size)[1]  # the supervised baseline reads labelled ones
        console.print(
            f"done: {result.steps} steps in {result.train_seconds:.1f} s ({result.images_per_second:.0f} {kind} "
            f"img/s, data wait {100 * result.data_fraction:.1f}%); checkpoint {result.checkpoint}"
        )


@app.command("knn-eval")
@user_errors
def knn_eval(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="A checkpoint.pt written by `paws pretrain`, or a released suncet checkpoint."),
    ],
    overrides: OverridesArg = None,
    recipe: RecipeOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Results JSON (default: knn_eval.json, or knn_eval_val.json for --on val, beside the checkpoint)."
        ),
    ] = None,
    on: Annotated[
        str,
        typer.Option(
            help="Queries: test (the test split) or val (eval.val_images train images outside the labelled "
            "subset, for choosing settings without the test set)."
        ),
    ] = "test",
) -> None:
    """PAWS-NN (soft nearest neighbour) and k-NN top-1/top-5 on the test set (or the validation split), banked on the
    run's labelled subset."""
    from paws_cli.eval.knn_eval import knn_eval_command

    knn_eval_command(checkpoint, recipe, overrides or [], output=output, console=console, on=on)


@app.command()
@user_errors
def finetune(
    checkpoint: Annotated[
        Path, typer.Argument(help="A paws checkpoint or an authors' released PAWS .pth.tar.")
    ],
    overrides: OverridesArg = None,
    recipe: RecipeOption = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted fine-tuning run.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start again in an existing run directory.")] = False,
) -> None:
    """Fine-tune (SimCLRv2 protocol) or linear-probe a pretrained checkpoint on the labelled subset."""
    from paws_cli.finetune.command import finetune_command

    finetune_command(checkpoint, recipe, overrides or [], console=console, resume=resume, overwrite=overwrite)


@app.command()
@user_errors
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A paws checkpoint or an authors' released PAWS .pth.tar.")
    ],
    out: Annotated[Path, typer.Argument(help="Output weights file.")],
    fmt: Annotated[
        str, typer.Option("--format", help="safetensors or timm (a torch state_dict file).")
    ] = "safetensors",
    with_projection: Annotated[bool, typer.Option(help="Also export the first projection layer.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Export the backbone with timm key names, loadable by timm.create_model(..., checkpoint_path=OUT)."""
    from paws_cli.export import export_command

    export_command(
        checkpoint, out, fmt=fmt, with_projection=with_projection, console=console, overwrite=overwrite
    )


convert_app = typer.Typer(
    help="Convert a dataset: your own images or arrays, or fashion-mnist (the toolkit's in-memory array format), "
    "or imagefolder (an FFCV .beton).",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert-dataset")
cli_convert.register(convert_app, user_errors, console, err_console)  # its four commands


@app.command("make-splits")
@user_errors
def make_splits(
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="[DATASET] OUT",
            help="The dataset (an array dataset directory, an ImageFolder train root or a .beton with its "
            "sidecar index; or give it with --dataset), then the output directory for labelled.txt (and val.txt).",
        ),
    ],
    dataset_opt: Annotated[
        Path | None, typer.Option("--dataset", help="The dataset, instead of the first argument.")
    ] = None,
    official: Annotated[
        str | None,
        typer.Option(
            help="Official labelled list: 1% or 10% (ImageNet, shipped), cifar10-4000-SEED (shipped), or a "
            "split file path."
        ),
    ] = None,
    per_class: Annotated[
        int | None, typer.Option(help="Labelled images per class (seeded, class-balanced).")
    ] = None,
    percent: Annotated[float | None, typer.Option(help="Labelled percentage of each class.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the draw.")] = 0,
    val: Annotated[
        bool,
        typer.Option("--val", help="Also write val.txt: ImageNet's official held-out list (12 per class)."),
    ] = False,
    val_per_class: Annotated[
        int, typer.Option(help="Also write val.txt: a seeded draw of this many held-out images per class.")
    ] = 0,
    dataset_classes_only: Annotated[
        bool,
        typer.Option(
            "--dataset-classes-only",
            help="Keep only the official names whose class the dataset has (prints what it drops); for subsets "
            "of ImageNet's classes.",
        ),
    ] = False,
) -> None:
    """Write the labelled-subset split file (and a held-out val.txt) for a dataset, checked against it."""
    from data_tools.make_splits import make_splits as make

    if dataset_opt is not None and len(paths) != 1:
        raise ValueError("with --dataset, give only the output directory as argument")
    if dataset_opt is None and len(paths) != 2:
        raise ValueError("give the dataset and the output directory: paws make-splits DATASET OUT")
    dataset, out = (dataset_opt, paths[0]) if dataset_opt is not None else (paths[0], paths[1])
    if sum(x is not None for x in (per_class, percent, official)) != 1:
        raise ValueError("give exactly one of --per-class, --percent or --official")
    written = make(
        dataset,
        out,
        per_class=per_class,
        percent=percent,
        seed=seed,
        official=official,
        val=val,
        val_per_class=val_per_class,
        dataset_classes_only=dataset_classes_only,
        log=lambda msg: console.print(msg, highlight=False),
    )
    for kind, path in written.items():
        console.print(f"wrote {kind}: {path}", highlight=False)


@recipes_app.command("ls")
@user_errors
def recipes_ls() -> None:
    """Table of the named recipes with their global sizes (recipes give per-process sizes for `world size`)."""
    from paws_cli.cli_views import recipes_view

    # Wrapped to the console's width (soft_wrap off): descriptions wrap, names and numbers stay whole.
    console.print(recipes_view(console.width), soft_wrap=False)


@recipes_app.command("show")
@user_errors
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name or path.")]) -> None:
    """Print a recipe file and its fully resolved settings."""
    path = find_recipe(name)
    console.print(f"# {path}", highlight=False)
    console.print(path.read_text(), highlight=False, markup=False)
    console.print("# resolved:", highlight=False)
    from paws_cli.reproduce.recipe_table import load_for_listing  # an unset data.path gets a stand-in

    console.print(settings_to_yaml(load_for_listing(name)), highlight=False, markup=False, end="")


@app.command()
@user_errors
def reproduce(
    table: Annotated[
        str,
        typer.Argument(
            help="table1 (ResNet-50: Table 1), table2 (wider ResNets: Table 2) or semppl (SemPPL, ResNet-50)."
        ),
    ],
    imagenet: Annotated[
        Path | None,
        typer.Option(
            help="ImageNet root with train/<wnid>/ and val/<wnid>/ (full scale; not with --scale smoke)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Print every step with its state and V100-hour estimate; run nothing.")
    ] = False,
    scale: Annotated[
        str,
        typer.Option(
            help="full (the paper's recipes) or smoke (the same steps on tiny generated data, CPU)."
        ),
    ] = "full",
    out: Annotated[Path, typer.Option(help="Report folder (TABLE.md, TABLE.json).")] = Path("reports"),
    work: Annotated[
        Path | None,
        typer.Option(
            help="Folder for converted data, splits, runs and logs (default runs/reproduce[_smoke])."
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="Pretraining data: ffcv (.beton), folder (JPEGs) or auto (ffcv when installed)."
        ),
    ] = "auto",
    launcher: Annotated[
        str | None,
        typer.Option(
            help="Command that starts pretraining and fine-tuning, e.g. 'torchrun --nproc_per_node 8'."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=VALUE override for every pretrain, knn-eval and finetune step."),
    ] = None,
    pretrain_set: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE override for pretraining only (e.g. run.launcher=slurm slurm.nodes=8)."),
    ] = None,
) -> None:
    """Reproduce PAWS's Table 1 or 2, or SemPPL's table: convert, make splits, pretrain, evaluate, report
    (resumable)."""
    from paws_cli.reproduce.command import reproduce_command

    if fmt not in ("auto", "ffcv", "folder"):
        raise ValueError(f"--format must be auto, ffcv or folder, got {fmt!r}")
    code = reproduce_command(
        table,
        imagenet=imagenet,
        scale=scale,  # type: ignore[arg-type]  # checked by reproduce_command
        out=out,
        work=work,
        dry_run=dry_run,
        data_format=fmt,  # type: ignore[arg-type]
        launcher=launcher,
        overrides=set_ or [],
        pretrain_overrides=pretrain_set or [],
        console=console,
        cli_app=app,
    )
    if code:
        raise typer.Exit(code)


@app.command("settings")
@user_errors
def settings_cmd(overrides: OverridesArg = None, recipe: RecipeOption = None) -> None:
    """Every settings key with its resolved value and documentation."""
    from paws_cli.cli_views import settings_view

    settings = _settings(recipe, overrides)
    console.print(settings_view(settings, console.width), soft_wrap=False)


@app.command()
@user_errors
def sweep(
    axes: Annotated[
        list[str],
        typer.Argument(
            metavar="KEY=V1,V2,...",
            help="Settings to sweep and their values (commas inside [...] stay in one value: "
            "augment.large_scale=[0.3,1.0],[0.5,1.0]); a key with one value is fixed for every trial.",
        ),
    ],
    recipe: RecipeOption = None,
    budget_s: Annotated[
        float | None,
        typer.Option("--budget-s", help="Wall-clock budget of each trial in seconds (run.time_budget_s)."),
    ] = None,
    trials: Annotated[
        int | None,
        typer.Option(help="Run N trials proposed by optuna's TPE sampler (seeded) instead of the full grid."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Sweep directory under run.out_dir (default sweep_<recipe>).")
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="Validation top-1 that selects: auto (classifier for method=supervised, else PAWS-NN), "
            "paws_nn, knn or classifier."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the TPE sampler (--trials).")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Delete the sweep directory's records and trial runs and start again.")
    ] = False,
) -> None:
    """Train one run per trial, select on a validation split carved from the train images (never the test set),
    then test the selected trial once; re-running the same command resumes."""
    from paws_cli.sweep.runner import run_sweep

    run_sweep(
        recipe,
        axes,
        console=console,
        name=name,
        budget_s=budget_s,
        trials=trials,
        metric=metric,
        seed=seed,
        overwrite=overwrite,
    )


DEMO_HELP = (
    "Does PAWS beat training on your labels alone? A table that answers it, on any dataset.\n\n"
    "Pretrains PAWS (and SemPPL, when a recipe semppl_<recipe> exists) with one wall-clock budget, then compares "
    "their nearest-neighbour and fine-tuned accuracy with a supervised-only baseline (same labels, same budget) "
    "and with raw pixels.\n\n"
    "Fashion-MNIST by default; your own data with data.path=DIR, a folder made by `paws convert-dataset images "
    "SRC DIR` (one sub-folder of images per class) or `paws convert-dataset arrays FILE.npz DIR`. The views are "
    "sized from the images; a dataset with fewer classes than the recipe's labelled classes per step is fitted."
)


@app.command(help=DEMO_HELP)
@user_errors
def demo(
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Demo recipe.")] = "fmnist_demo",
    overrides: OverridesArg = None,
) -> None:
    """Does PAWS beat training on your labels alone? A table that answers it, on any dataset (see DEMO_HELP)."""
    from paws_cli.demo import run_demo

    run_demo(recipe, overrides or [], console)


@app.command("report")
@user_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (one, or several to overlay).")],
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder (default: RUN/report for one run, ./paws_report for several)."),
    ] = None,
) -> None:
    """One HTML page with the runs' curves (loss terms, lr, speed, health signals), evaluation results and
    the settings that differ; works on finished, running and killed runs."""
    from paws_cli.report.command import report_command

    report_command(runs, out, console)


def main() -> None:
    app(prog_name="paws")


if __name__ == "__main__":
    sys.exit(main())
