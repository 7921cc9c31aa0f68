"""How fine-tuning reads on the console: one bar whose text carries the last epoch's accuracies instead of a line
per epoch (fine-tuning runs many short epochs), what the checkpoint holds, and the epoch it selected."""

from __future__ import annotations

from paws_cli.finetune.results import FinetuneResult
from paws_cli.method_registry import method_names
from paws_cli.pretrained import PretrainedWeights
from paws_cli.train.banner import method_title
from paws_cli.train.progress import EpochText


def finetune_epoch_text(epochs: float) -> EpochText:
    """Formats an epoch's record ('epoch 12/50: train 91.2%, held-out 85.0%') for the fine-tuning bar."""

    def text(epoch: int, values: dict[str, float]) -> str:
        shown = [f"train {values['train_accuracy']:.1f}%"] if "train_accuracy" in values else []
        if "heldout_top1" in values:
            shown.append(f"held-out {values['heldout_top1']:.1f}%")
        return f"epoch {epoch}/{epochs:g}" + (f": {', '.join(shown)}" if shown else "")

    return text


def pretrained_text(weights: PretrainedWeights) -> str:
    """What a checkpoint holds, for the start line: 'SemPPL pretraining', 'the authors' released PAWS weights'."""
    if weights.kind == "suncet":
        return "the authors' released PAWS weights"
    if weights.kind == "paws-finetune":
        return "a fine-tuned backbone"
    method = str((weights.settings or {}).get("method") or "paws")
    title = method_title(method) if method in method_names() else method
    return title if method == "supervised" else f"{title} pretraining"


def selection_text(result: FinetuneResult) -> str:
    """'selected epoch 37 of 50 by held-out top-1 (85.00% on 20 images); test top-1 81.12%' (finetune.select=loss:
    'by held-out loss'; select=last: 'the last epoch (50) of 50, trained on all 100 labelled images; ...'), or ''
    before the end."""
    if result.selected_epoch is None:
        return ""
    test = f"test top-1 {result.test_top1 or 0.0:.2f}%"
    if result.select == "last":
        return (
            f"the last epoch ({result.selected_epoch}) of {result.epochs:g}, trained on {result.train_images} "
            f"labelled images; {test}"
        )
    if result.heldout_top1 is None:
        return ""
    by = "held-out loss (top-1 " if result.select == "loss" else "held-out top-1 ("
    return (
        f"selected epoch {result.selected_epoch} of {result.epochs:g} by {by}{result.heldout_top1:.2f}% "
        f"on {result.heldout_images} images); {test}"
    )
