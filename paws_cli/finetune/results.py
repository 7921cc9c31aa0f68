"""The outcome of a fine-tuning run: a record written as finetune.json and a rich table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table


@dataclass
class FinetuneResult:
    """What `paws finetune` reports. Accuracies are percentages; test numbers belong to the selected epoch."""

    pretrained: str
    pretrained_kind: str
    mode: str
    dataset: str
    run_dir: str
    checkpoint: str
    best_checkpoint: str
    train_images: int
    heldout_images: int
    heldout_source: str
    test_images: int
    epochs: float
    steps: int
    complete: bool
    train_seconds: float
    select: str = "accuracy"  # finetune.select: how the tested epoch was chosen ('last': no held-out images)
    selected_epoch: int | None = None
    heldout_top1: float | None = None
    heldout_top5: float | None = None
    test_top1: float | None = None
    test_top5: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def finetune_table(result: FinetuneResult) -> Table:
    """Held-out (selection) and test accuracy of the selected epoch."""
    what = "fine-tuned" if result.mode == "full" else "linear probe"
    table = Table(title=f"{what}: {result.pretrained} on {result.dataset}")
    for col in ("set", "images", "top-1 %", "top-5 %"):
        table.add_column(col, justify="left" if col == "set" else "right")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    epoch = "-" if result.selected_epoch is None else str(result.selected_epoch)
    if result.heldout_images:
        role = "selection" if result.select != "last" else "not used to select"
        table.add_row(
            f"held-out ({role}, epoch {epoch})",
            str(result.heldout_images),
            fmt(result.heldout_top1),
            fmt(result.heldout_top5),
        )
    table.add_row("test", str(result.test_images), fmt(result.test_top1), fmt(result.test_top5))
    return table
