"""How fine-tuning's progress reads: one bar whose text carries the last epoch's accuracies, instead of a line
per epoch (fine-tuning runs many short epochs)."""

from __future__ import annotations

from paws_cli.train.progress import EpochText


def finetune_epoch_text(epochs: float) -> EpochText:
    """Formats an epoch's record ('epoch 12/50: train 91.2%, held-out 85.0%') for the fine-tuning bar."""

    def text(epoch: int, values: dict[str, float]) -> str:
        shown = [f"train {values['train_accuracy']:.1f}%"] if "train_accuracy" in values else []
        if "heldout_top1" in values:
            shown.append(f"held-out {values['heldout_top1']:.1f}%")
        return f"epoch {epoch}/{epochs:g}" + (f": {', '.join(shown)}" if shown else "")

    return text
