"""`paws demo` / `make demo`: PAWS on Fashion-MNIST beside a supervised-only and a raw-pixel baseline.

1. pretrain PAWS with the recipe; 2. PAWS-NN with the run's labelled subset as bank; 3. the supervised-only
baseline (same backbone, augmentations and labelled images) trained for the same wall-clock time as PAWS;
4. raw-pixel soft-NN on the same labelled images; 5. a table, also written to runs/<name>/demo_results.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from paws_cli.config import load_settings
from paws_cli.data.pipeline import load_dataset
from paws_cli.eval.knn_eval import evaluate_checkpoint, raw_pixel_soft_nn
from paws_cli.io_utils import atomic_write_text
from paws_cli.train.checkpoint import load_checkpoint
from paws_cli.train.loop import train


def run_demo(recipe: str, overrides: Sequence[str], console: Console) -> dict[str, object]:
    started = time.perf_counter()
    name = load_settings(recipe, overrides).run.name or recipe
    paws_settings = load_settings(recipe, [*overrides, f"run.name={name}"])
    console.rule(f"[bold]1/4 PAWS pretraining ({recipe})")
    paws = train(paws_settings, overwrite=True, console=console, default_name=name)
    console.rule("[bold]2/4 PAWS-NN evaluation")
    paws_state = load_checkpoint(paws.checkpoint)
    paws_eval = evaluate_checkpoint(paws_state, paws_settings, str(paws.checkpoint))

    console.rule(f"[bold]3/4 supervised-only baseline, same budget ({paws.train_seconds:.0f} s)")
    sup_settings = load_settings(
        recipe,
        [
            *overrides,
            "method=supervised",
            f"run.name={name}_supervised",
            f"run.time_budget_s={paws.train_seconds:.1f}",
        ],
    )
    supervised = train(sup_settings, overwrite=True, console=console, default_name=f"{name}_supervised")
    sup_eval = evaluate_checkpoint(
        load_checkpoint(supervised.checkpoint), sup_settings, str(supervised.checkpoint)
    )

    console.rule("[bold]4/4 raw-pixel soft-NN")
    dataset = load_dataset(paws_settings.data)
    raw = raw_pixel_soft_nn(dataset, paws_state["labelled"].numpy(), tau=paws_settings.eval.soft_nn_tau)

    labelled = len(paws_state["labelled"])
    rows = [
        (
            "PAWS-NN (soft nearest neighbour)",
            paws_eval.paws_nn_top1,
            paws_eval.paws_nn_top5,
            paws.train_seconds,
        ),
        (
            "supervised-only (same labels, same budget)",
            sup_eval.classifier_top1,
            sup_eval.classifier_top5,
            supervised.train_seconds,
        ),
        ("raw-pixel soft-NN (same labels)", raw[1], raw[5], None),
    ]
    table = Table(title=f"{dataset.name}: top-1 on the {paws_eval.queries}-image test set, {labelled} labels")
    for col in ("method", "top-1 %", "top-5 %", "train s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for label, top1, top5, seconds in rows:
        table.add_row(label, f"{top1:.2f}", f"{top5:.2f}", "-" if seconds is None else f"{seconds:.0f}")
    console.print(table)
    total = time.perf_counter() - started
    margin_sup = paws_eval.paws_nn_top1 - (sup_eval.classifier_top1 or 0.0)
    margin_raw = paws_eval.paws_nn_top1 - raw[1]
    console.print(
        f"PAWS-NN vs supervised-only: {margin_sup:+.2f} points; vs raw pixels: {margin_raw:+.2f} points. "
        f"PAWS: {paws.steps} steps, {paws.images_per_second:.0f} unlabelled img/s, data wait "
        f"{100 * paws.data_fraction:.1f}%. Demo wall-clock {total:.0f} s."
    )
    results: dict[str, object] = {
        "recipe": recipe,
        "labelled_images": labelled,
        "test_images": paws_eval.queries,
        "paws_nn": {
            "top1": paws_eval.paws_nn_top1,
            "top5": paws_eval.paws_nn_top5,
            "knn_top1": paws_eval.knn_top1,
        },
        "supervised_only": {
            "top1": sup_eval.classifier_top1,
            "top5": sup_eval.classifier_top5,
            "train_seconds": supervised.train_seconds,
            "steps": supervised.steps,
        },
        "raw_pixel_soft_nn": {"top1": raw[1], "top5": raw[5]},
        "paws_train_seconds": paws.train_seconds,
        "paws_steps": paws.steps,
        "paws_images_per_second": paws.images_per_second,
        "paws_data_wait_fraction": paws.data_fraction,
        "demo_wall_seconds": total,
    }
    atomic_write_text(paws.run_dir / "demo_results.json", json.dumps(results, indent=2) + "\n")
    return results
