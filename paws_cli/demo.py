"""`paws demo` / `make demo`: PAWS and SemPPL beside a supervised-only and a raw-pixel baseline, on Fashion-MNIST or
any in-memory dataset (``data.path=DIR`` from `paws convert-dataset images|arrays`): does PAWS beat training on
your labels alone?

1. pretrain PAWS with the recipe (its epochs fix the budget); 2. PAWS-NN with the run's labelled subset as bank;
3. PAWS fine-tuned with the recipe's finetune.* settings (the demo recipes: on every labelled image for a fixed
number of epochs; SimCLRv2's protocol holds finetune.val_per_class images per class out to select the epoch); 4-6. the same for SemPPL (recipe
``semppl_<recipe>``), trained for the same wall-clock time as PAWS; 7. the supervised-only baseline (same backbone,
augmentations and labelled images), same wall-clock time; 8. raw-pixel soft-NN on the same labelled images; then
one table, also written to runs/<name>/demo_results.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from paws_cli.config import Settings, load_settings, recipe_names
from paws_cli.config.trees import lookup
from paws_cli.data.backends.memory import load_dataset
from paws_cli.data.datasets.arrays import ArrayDataset
from paws_cli.eval.knn_eval import KnnResult, evaluate_checkpoint, raw_pixel_soft_nn, results_path
from paws_cli.finetune.progress import selection_text
from paws_cli.finetune.results import FinetuneResult
from paws_cli.finetune.train import run_finetune
from paws_cli.io_utils import atomic_write_text
from paws_cli.pretrained import load_pretrained, resolve_settings
from paws_cli.report import write_report
from paws_cli.train.checkpoint_io import load_checkpoint
from paws_cli.train.loop import TrainResult, train


@dataclass
class Learned:
    """One pretrained method of the demo: its run, its nearest-neighbour evaluation and its fine-tuning."""

    label: str
    run: TrainResult
    knn: KnnResult
    finetuned: FinetuneResult


def _pretrain_and_evaluate(
    label: str, settings: Settings, name: str, console: Console, step: int, steps: int
) -> Learned:
    console.rule(f"[bold]{step}/{steps} {label} pretraining")
    run = train(settings, overwrite=True, console=console, default_name=name)
    console.rule(f"[bold]{step + 1}/{steps} {label}-NN evaluation, then fine-tuning")
    knn = _save_knn(
        evaluate_checkpoint(load_checkpoint(run.checkpoint), settings, str(run.checkpoint)), run.checkpoint
    )
    weights = load_pretrained(run.checkpoint)
    # The checkpoint's settings hold the recipe's finetune.* values and the demo's overrides. One thread: batches
    # of 16 small images gain nothing from a second, which on a busy machine spin-waits.
    ft_settings, _ = resolve_settings(
        weights, None, [f"run.name={name}_finetune", "run.num_threads=1"], new_run=True
    )
    finetuned = run_finetune(
        ft_settings, weights, overwrite=True, console=console, default_name=f"{name}_finetune"
    )
    console.print(f"{label} fine-tuned: {selection_text(finetuned)}", highlight=False)
    return Learned(label, run, knn, finetuned)


def semppl_recipe_for(recipe: str) -> str | None:
    """The SemPPL recipe paired with a demo recipe (``semppl_<recipe>``), or None when there is none."""
    name = f"semppl_{recipe}"
    return name if name in recipe_names() else None


def supervised_recipe_for(recipe: str) -> str:
    """The supervised baseline's recipe: ``supervised_<recipe>`` when there is one (its own tuned settings, as
    SemPPL has ``semppl_<recipe>``), else the demo recipe itself (run with method=supervised)."""
    name = f"supervised_{recipe}"
    return name if name in recipe_names() else recipe


#: Labelled classes per step of the demo's methods: at most the dataset's class count.
CLASS_KEYS = (
    "paws.classes_per_batch",
    "supervised.classes_per_batch",
    "semppl.labelled_batch.classes_per_batch",
)


def fit_to_dataset(
    recipes: Sequence[str], overrides: Sequence[str], console: Console
) -> tuple[list[str], ArrayDataset]:
    """The dataset the demo runs on (any in-memory dataset), and overrides that fit the recipes' labelled
    classes per step to its class count (a key the user gave is left alone)."""
    settings = load_settings(recipes[0], overrides)
    if settings.data.format != "memory":
        raise ValueError(
            f"paws demo runs on in-memory data, and data.path={settings.data.path} is {settings.data.dataset} "
            f"data (data.format={settings.data.format}); convert a folder of class folders with `paws "
            "convert-dataset images SRC OUT` (or arrays with `paws convert-dataset arrays FILE.npz OUT`) and "
            "pass data.path=OUT"
        )
    dataset = load_dataset(settings.data)
    given = {o.split("=", 1)[0].strip() for o in overrides}
    extra: dict[str, int] = {}
    for name in recipes:
        tree = load_settings(name, overrides).model_dump(mode="json")
        for key in CLASS_KEYS:
            value = lookup(tree, key)
            if key not in given and isinstance(value, int) and value > dataset.num_classes:
                extra[key] = dataset.num_classes
    if extra:
        console.print(
            f"note: {dataset.name} has {dataset.num_classes} classes: "
            + " ".join(f"{k}={v}" for k, v in extra.items())
            + " (the recipe asks for more labelled classes per step)",
            highlight=False,
        )
    note = short_schedule_note(settings, len(dataset.train_labels))
    if note:
        console.print(note, style="yellow", highlight=False, markup=False)
    return [f"{k}={v}" for k, v in extra.items()], dataset


#: Fewer steps than this and the demo says how to give the recipe's compute in steps (PAWS learns over
#: thousands of steps; fmnist_demo's 2.5 epochs are 2,342 steps of Fashion-MNIST's 60,000 images).
SHORT_SCHEDULE = 1000


def short_schedule_note(settings: Settings, train_images: int) -> str | None:
    """A warning when the recipe's length in epochs makes few steps of a small dataset, with the overrides that
    give it in steps instead (Fashion-MNIST's count for the demo recipes)."""
    o = settings.optim
    if o.epochs is None or o.total_steps is not None:
        return None
    steps = round(o.epochs * max(train_images // o.batch_size, 1))
    if steps >= SHORT_SCHEDULE:
        return None
    per_epoch = 60000 // o.batch_size
    total = round(o.epochs * per_epoch)
    warmup = round((o.warmup_epochs or 0) * per_epoch)
    return (
        f"warning: {o.epochs:g} epochs of {train_images} training images are only {steps} steps, too few for "
        f"PAWS to learn much; for the compute the recipe was tuned with on Fashion-MNIST pass "
        f"optim.total_steps={total} optim.warmup_steps={warmup}"
    )


def run_demo(recipe: str, overrides: Sequence[str], console: Console) -> dict[str, object]:
    started = time.perf_counter()
    semppl_recipe = semppl_recipe_for(recipe)
    supervised_recipe = supervised_recipe_for(recipe)
    recipes = list(dict.fromkeys([recipe, *([semppl_recipe] if semppl_recipe else []), supervised_recipe]))
    fitted, dataset = fit_to_dataset(recipes, overrides, console)
    overrides = [*overrides, *fitted]
    name = load_settings(recipe, overrides).run.name or recipe
    steps = 8 if semppl_recipe else 5
    paws_settings = load_settings(recipe, [*overrides, f"run.name={name}"])
    paws = _pretrain_and_evaluate("PAWS", paws_settings, name, console, 1, steps)
    budget = f"run.time_budget_s={paws.run.train_seconds:.1f}"  # every learned method gets PAWS's wall-clock
    learned = [paws]
    if semppl_recipe:
        semppl_settings = load_settings(semppl_recipe, [*overrides, f"run.name={name}_semppl", budget])
        learned.append(_pretrain_and_evaluate("SemPPL", semppl_settings, f"{name}_semppl", console, 4, steps))
    console.rule(
        f"[bold]{steps - 1}/{steps} supervised-only baseline, same budget ({paws.run.train_seconds:.0f} s)"
    )
    sup_settings = load_settings(
        supervised_recipe, [*overrides, "method=supervised", f"run.name={name}_supervised", budget]
    )
    supervised = train(sup_settings, overwrite=True, console=console, default_name=f"{name}_supervised")
    sup_eval = _save_knn(
        evaluate_checkpoint(load_checkpoint(supervised.checkpoint), sup_settings, str(supervised.checkpoint)),
        supervised.checkpoint,
    )

    console.rule(f"[bold]{steps}/{steps} raw-pixel soft-NN")
    labelled = load_checkpoint(paws.run.checkpoint)["labelled"].numpy()
    raw = raw_pixel_soft_nn(dataset, labelled, tau=paws_settings.eval.soft_nn_tau)
    title = f"{dataset.name}: top-1 on the {paws.knn.queries}-image test set, {len(labelled)} labels"
    results = _report(title, learned, supervised, sup_eval, raw, console)
    results |= {"recipe": recipe, "semppl_recipe": semppl_recipe, "labelled_images": len(labelled)}
    results["test_images"] = paws.knn.queries
    results["demo_wall_seconds"] = time.perf_counter() - started
    console.print(f"Demo wall-clock {results['demo_wall_seconds']:.0f} s.")
    atomic_write_text(paws.run.run_dir / "demo_results.json", json.dumps(results, indent=2) + "\n")
    run_dirs = [m.run.run_dir for m in learned] + [supervised.run_dir]
    results["report"] = _write_report(run_dirs, paws.run.run_dir / "report", console)
    return results


def _save_knn(result: KnnResult, checkpoint: Path) -> KnnResult:
    """knn_eval.json beside the checkpoint, as `paws knn-eval` writes it (`paws report` reads it)."""
    atomic_write_text(results_path(checkpoint), json.dumps(result.as_dict(), indent=2) + "\n")
    return result


def _write_report(run_dirs: list[Path], out: Path, console: Console) -> str | None:
    """The report of the demo's runs (`paws report`); a failure is a warning, the results being written."""
    try:
        page = write_report(run_dirs, out)
    except Exception as exc:  # drawing plots must not lose a demo that has finished
        console.print(
            f"warning: the demo's report was not written ({type(exc).__name__}: {exc}); the numbers are in "
            "demo_results.json, and `paws report` draws the runs later",
            style="yellow",
            markup=False,
            highlight=False,
        )
        return None
    console.print(f"report of the demo's runs: {page}", highlight=False, markup=False)
    return str(page)


def _report(
    title: str,
    learned: list[Learned],
    supervised: TrainResult,
    sup_eval: KnnResult,
    raw: dict[int, float],
    console: Console,
) -> dict[str, Any]:
    """Print the demo table and the margins; return the numbers for demo_results.json."""
    rows: list[tuple[str, float | None, float | None, str]] = []
    for m in learned:
        rows.append(
            (
                f"{m.label}-NN (soft nearest neighbour)",
                m.knn.paws_nn_top1,
                m.knn.paws_nn_top5,
                f"{m.run.train_seconds:.0f}",
            )
        )
    for m in learned:
        f = m.finetuned
        if f.select == "last":  # a fixed epoch count chosen beforehand: every label trains, none selects
            text = f"{m.label} fine-tuned ({f.train_images} labels, {f.epochs:g} epochs)"
        else:
            text = f"{m.label} fine-tuned ({f.train_images} labels train, {f.heldout_images} select)"
        rows.append((text, f.test_top1, f.test_top5, f"+{f.train_seconds:.0f}"))
    rows.append(
        (
            "supervised-only (same labels, same budget)",
            sup_eval.classifier_top1,
            sup_eval.classifier_top5,
            f"{supervised.train_seconds:.0f}",
        )
    )
    rows.append(("raw-pixel soft-NN (same labels)", raw[1], raw[5], "-"))
    table = Table(title=title)
    for col in ("method", "top-1 %", "top-5 %", "train s"):
        table.add_column(col, justify="left" if col == "method" else "right", overflow="fold")
    for label, top1, top5, seconds in rows:
        table.add_row(label, f"{top1 or 0.0:.2f}", f"{top5 or 0.0:.2f}", seconds)
    console.print(table)
    sup_top1 = sup_eval.classifier_top1 or 0.0
    for m in learned:
        console.print(
            f"{m.label}-NN vs supervised-only: {m.knn.paws_nn_top1 - sup_top1:+.2f} points; vs raw pixels: "
            f"{m.knn.paws_nn_top1 - raw[1]:+.2f}; fine-tuned vs supervised-only: "
            f"{(m.finetuned.test_top1 or 0.0) - sup_top1:+.2f}. {m.run.steps} steps, "
            f"{m.run.steps / max(m.run.train_seconds, 1e-9):.2f} steps/s, {m.run.images_per_second:.0f} img/s, "
            f"data wait {100 * m.run.data_fraction:.1f}%."
        )
        health = {k: v for k, v in m.run.last_epoch.items() if k in HEALTH_SIGNALS}
        if health:
            console.print(
                f"  {m.label} health (last epoch means): "
                + ", ".join(f"{k} {v:.3f}" for k, v in health.items())
            )
    return _results_json(learned, supervised, sup_eval, raw)


def _results_json(
    learned: list[Learned], supervised: TrainResult, sup_eval: KnnResult, raw: dict[int, float]
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "supervised_only": {
            "top1": sup_eval.classifier_top1,
            "top5": sup_eval.classifier_top5,
            "train_seconds": supervised.train_seconds,
            "steps": supervised.steps,
        },
        "raw_pixel_soft_nn": {"top1": raw[1], "top5": raw[5]},
    }
    for m in learned:
        key = m.label.lower()
        f = m.finetuned
        out[f"{key}_nn"] = {
            "top1": m.knn.paws_nn_top1,
            "top5": m.knn.paws_nn_top5,
            "knn_top1": m.knn.knn_top1,
        }
        out[f"{key}_finetuned"] = {
            "top1": f.test_top1, "top5": f.test_top5, "heldout_top1": f.heldout_top1,
            "selected_epoch": f.selected_epoch, "train_images": f.train_images,
            "heldout_images": f.heldout_images, "train_seconds": f.train_seconds, "steps": f.steps,
        }  # fmt: skip
        out[f"{key}_run"] = {
            "train_seconds": m.run.train_seconds,
            "steps": m.run.steps,
            "images_per_second": m.run.images_per_second,
            "data_wait_fraction": m.run.data_fraction,
            "last_epoch": m.run.last_epoch,
        }
    return out


#: The health signals printed under the table (PAWS: Figure 3's; SemPPL: issue 12's).
HEALTH_SIGNALS = (
    "target_confidence",
    "support_accuracy",
    "me_max_kl",
    "pseudo_label_accuracy",
    "valid_positives",
    "vote_agreement",
    "queue_classes",
)
