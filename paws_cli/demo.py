"""`paws demo` / `make demo`: PAWS on Fashion-MNIST beside a supervised-only and a raw-pixel baseline.

1. pretrain PAWS with the recipe; 2. PAWS-NN with the run's labelled subset as bank; 3. PAWS fine-tuned
(SimCLRv2-style, the recipe's finetune.* settings) on the labelled subset minus finetune.val_per_class images per
class, which select the epoch; 4. the supervised-only baseline (same backbone, augmentations and labelled
images) trained for the same wall-clock time as PAWS; 5. raw-pixel soft-NN on the same labelled images; then a
table, also written to runs/<name>/demo_results.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from paws_cli.config import load_settings
from paws_cli.data.backends.memory import load_dataset
from paws_cli.eval.knn_eval import evaluate_checkpoint, raw_pixel_soft_nn
from paws_cli.finetune.train import run_finetune
from paws_cli.io_utils import atomic_write_text
from paws_cli.pretrained import load_pretrained, resolve_settings
from paws_cli.train.checkpoint_io import load_checkpoint
from paws_cli.train.loop import train


def run_demo(recipe: str, overrides: Sequence[str], console: Console) -> dict[str, object]:
    started = time.perf_counter()
    name = load_settings(recipe, overrides).run.name or recipe
    paws_settings = load_settings(recipe, [*overrides, f"run.name={name}"])
    console.rule(f"[bold]1/5 PAWS pretraining ({recipe})")
    paws = train(paws_settings, overwrite=True, console=console, default_name=name)
    console.rule("[bold]2/5 PAWS-NN evaluation")
    paws_state = load_checkpoint(paws.checkpoint)
    paws_eval = evaluate_checkpoint(paws_state, paws_settings, str(paws.checkpoint))

    console.rule("[bold]3/5 PAWS fine-tuning (labelled subset; epoch selected on held-out labelled images)")
    weights = load_pretrained(paws.checkpoint)
    # The checkpoint's settings already hold the recipe's finetune.* values and the demo's overrides. One thread:
    # batches of 16 small images gain nothing from a second, which on a busy machine spin-waits (measured 6 s with
    # one thread vs 176 s with two under outside load, 3 s either way on an idle machine).
    ft_settings, _ = resolve_settings(
        weights, None, [f"run.name={name}_finetune", "run.num_threads=1"], new_run=True
    )
    finetuned = run_finetune(
        ft_settings, weights, overwrite=True, console=console, default_name=f"{name}_finetune"
    )

    console.rule(f"[bold]4/5 supervised-only baseline, same budget ({paws.train_seconds:.0f} s)")
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

    console.rule("[bold]5/5 raw-pixel soft-NN")
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
            f"PAWS fine-tuned ({finetuned.train_images} labels train, {finetuned.heldout_images} select)",
            finetuned.test_top1,
            finetuned.test_top5,
            finetuned.train_seconds,
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
        shown = "-" if seconds is None else f"{seconds:.0f}"
        if label.startswith("PAWS fine-tuned"):
            shown = f"+{shown}"  # on top of the PAWS pretraining above
        table.add_row(label, f"{top1:.2f}", f"{top5:.2f}", shown)
    console.print(table)
    total = time.perf_counter() - started
    margin_sup = paws_eval.paws_nn_top1 - (sup_eval.classifier_top1 or 0.0)
    margin_raw = paws_eval.paws_nn_top1 - raw[1]
    margin_ft = (finetuned.test_top1 or 0.0) - (sup_eval.classifier_top1 or 0.0)
    console.print(
        f"PAWS-NN vs supervised-only: {margin_sup:+.2f} points; vs raw pixels: {margin_raw:+.2f} points; "
        f"PAWS fine-tuned vs supervised-only: {margin_ft:+.2f} points (fine-tuning {finetuned.train_seconds:.0f} s). "
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
        "paws_finetuned": {
            "top1": finetuned.test_top1,
            "top5": finetuned.test_top5,
            "heldout_top1": finetuned.heldout_top1,
            "selected_epoch": finetuned.selected_epoch,
            "train_images": finetuned.train_images,
            "heldout_images": finetuned.heldout_images,
            "train_seconds": finetuned.train_seconds,
            "steps": finetuned.steps,
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
