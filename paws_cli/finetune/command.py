"""`paws finetune CHECKPOINT [--recipe R] [key=value ...]`: resolve settings, fine-tune, print and save the results.

Settings: the checkpoint's own (a toolkit checkpoint) < the recipe < environment < overrides; the architecture is
the checkpoint's. A released suncet checkpoint has no settings, so the data must come from the recipe or data.*
overrides. The run directory is ``run.out_dir/<pretraining run name>_finetune`` (``_linear`` for the probe)
unless run.name is given.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from paws_cli import collectives as dist
from paws_cli.finetune.progress import selection_text
from paws_cli.finetune.results import FinetuneResult, finetune_table
from paws_cli.finetune.train import RESULTS, run_finetune
from paws_cli.pretrained import PretrainedWeights, load_pretrained, resolve_settings


def default_run_name(weights: PretrainedWeights, mode: str) -> str:
    """``<pretraining run>_finetune`` / ``_linear``; a released checkpoint's file name stands in for the run."""
    suffix = "finetune" if mode == "full" else "linear"
    base = None
    if weights.settings is not None:
        base = (weights.settings.get("run") or {}).get("name") or weights.path.parent.name
    if not base:
        base = weights.path.name.removesuffix(".pth.tar").removesuffix(".pth").removesuffix(".pt")
    return f"{base}_{suffix}"


def finetune_command(
    checkpoint: Path,
    recipe: str | None,
    overrides: list[str],
    *,
    console: Console,
    resume: bool,
    overwrite: bool,
) -> FinetuneResult:
    """Fine-tune ``checkpoint`` as the settings say; print the table and where the results are."""
    weights = load_pretrained(checkpoint)
    settings, notes = resolve_settings(weights, recipe, overrides, new_run=True)
    main = dist.is_main_process()
    for note in notes if main else ():
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    result = run_finetune(
        settings,
        weights,
        resume=resume,
        overwrite=overwrite,
        console=console,
        default_name=default_run_name(weights, settings.finetune.mode),
    )
    if not main:
        return result
    if result.complete:
        console.print(finetune_table(result))
        console.print(selection_text(result), highlight=False)
        console.print(
            f"fine-tuning took {result.train_seconds:.1f} s for {result.steps} steps; "
            f"results: {Path(result.run_dir) / RESULTS}; selected weights: {result.best_checkpoint}"
        )
    else:
        console.print(
            f"stopped at step {result.steps} (run.max_steps); continue with the same command and --resume "
            f"(checkpoint {result.checkpoint})"
        )
    return result
