"""The published numbers `paws reproduce` compares against: the paper's Tables 1 and 2 (PAWS-SPEC section 8).

A table is a list of :class:`Cell`: one published top-1 accuracy, the pretraining run that should reproduce it
(recipe, epochs, label fraction) and which evaluation gives our number (PAWS-NN or fine-tuning). The numbers
are typed from the paper (seeds/000_*.txt, Tables 1 and 2), which the spec's section 8 repeats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Metric = Literal["finetune", "paws_nn"]

#: How the report names each evaluation.
METRIC_LABELS: dict[Metric, str] = {"finetune": "PAWS (fine-tuned)", "paws_nn": "PAWS-NN (no fine-tuning)"}


@dataclass(frozen=True)
class Cell:
    """One published top-1 number and what reproduces it."""

    table: str
    architecture: str  # as the paper names it
    recipe_prefix: str  # recipe = f"{recipe_prefix}_{1pct|10pct}"
    epochs: int
    fraction: str  # "1%" or "10%"
    metric: Metric
    paper_top1: float

    @property
    def recipe(self) -> str:
        """The recipe in paws_cli/recipes/ for this architecture and label fraction."""
        return f"{self.recipe_prefix}_{self.fraction.rstrip('%')}pct"

    @property
    def run_name(self) -> str:
        """The pretraining run (one per recipe and epoch count; both metrics of a row share it)."""
        return f"{self.recipe}_e{self.epochs}"


def _cells(
    table: str, architecture: str, prefix: str, metric: Metric, rows: dict[int, tuple[float, float]]
) -> list[Cell]:
    """Cells from ``{epochs: (top-1 at 1%, top-1 at 10%)}``."""
    return [
        Cell(table, architecture, prefix, epochs, fraction, metric, value)
        for epochs, values in rows.items()
        for fraction, value in zip(("1%", "10%"), values, strict=True)
    ]


#: Paper Table 1 (ResNet-50, ImageNet top-1 %): PAWS fine-tuned and PAWS-NN, 100/200/300 epochs, 1%/10% labels.
TABLE1: tuple[Cell, ...] = (
    *_cells(
        "table1", "ResNet-50", "r50", "finetune", {100: (63.8, 73.9), 200: (66.1, 75.0), 300: (66.5, 75.5)}
    ),
    *_cells(
        "table1", "ResNet-50", "r50", "paws_nn", {100: (61.5, 71.0), 200: (63.2, 71.9), 300: (64.2, 73.1)}
    ),
)

#: Paper Table 2 (wider ResNets, ImageNet top-1 %, fine-tuned): ResNet-50 x2 and x4, 100/200 epochs.
TABLE2: tuple[Cell, ...] = (
    *_cells("table2", "ResNet-50 (2x)", "r50x2", "finetune", {100: (68.2, 77.0), 200: (69.6, 77.8)}),
    *_cells("table2", "ResNet-50 (4x)", "r50x4", "finetune", {100: (69.8, 78.5), 200: (69.9, 79.0)}),
)

TABLES: dict[str, tuple[Cell, ...]] = {"table1": TABLE1, "table2": TABLE2}

TITLES: dict[str, str] = {
    "table1": "Table 1: ResNet-50 on ImageNet, top-1 %",
    "table2": "Table 2: wider ResNet-50s on ImageNet, fine-tuned top-1 %",
}


def table_cells(table: str) -> tuple[Cell, ...]:
    """The cells of ``table`` ("table1" or "table2"); a clear error otherwise."""
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; reproducible tables: {', '.join(TABLES)}") from None
