"""The published numbers `paws reproduce` compares against: the PAWS paper's Tables 1 and 2 (PAWS-SPEC section
8) and SemPPL's ImageNet numbers (SEMPPL-SPEC section 11).

A table is a list of :class:`Cell`: one published top-1 accuracy, the pretraining run that should reproduce it
(recipe, epochs, label fraction) and which evaluation gives our number (PAWS-NN or fine-tuning). The PAWS numbers
are typed from the paper (seeds/000_*.txt, Tables 1 and 2), which the spec's section 8 repeats; SemPPL's from its
abstract (SEMPPL-SPEC section 11). A cell the toolkit cannot reproduce says why (``unavailable``) and plans no step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Metric = Literal["finetune", "paws_nn"]

#: How the report names each evaluation of a method (PAWS's: "PAWS (fine-tuned)", "PAWS-NN (no fine-tuning)").
METRIC_LABELS: dict[Metric, str] = {
    "finetune": "{method} (fine-tuned)",
    "paws_nn": "{method}-NN (no fine-tuning)",
}


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
    method: str = "PAWS"  # as the paper names it
    unavailable: str = ""  # why the toolkit cannot reproduce this cell (no step is planned for it), or ""

    @property
    def label(self) -> str:
        """The method and evaluation as the report names them, e.g. "PAWS (fine-tuned)"."""
        return METRIC_LABELS[self.metric].format(method=self.method)

    @property
    def recipe(self) -> str:
        """The recipe in paws_cli/recipes/ for this architecture and label fraction."""
        return f"{self.recipe_prefix}_{self.fraction.rstrip('%')}pct"

    @property
    def run_name(self) -> str:
        """The pretraining run (one per recipe and epoch count; both metrics of a row share it)."""
        return f"{self.recipe}_e{self.epochs}"


def _cells(
    table: str,
    architecture: str,
    prefix: str,
    metric: Metric,
    rows: dict[int, tuple[float, float]],
    method: str = "PAWS",
    unavailable: str = "",
) -> list[Cell]:
    """Cells from ``{epochs: (top-1 at 1%, top-1 at 10%)}``."""
    return [
        Cell(table, architecture, prefix, epochs, fraction, metric, value, method, unavailable)
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

#: Why the SK rows have no run: SemPPL's best numbers use a selective-kernel ResNet-50 (SimCLRv2's R50 1x + SK).
NO_SK = "not reproducible: no SK backbone in the toolkit"

#: SemPPL (Bosnjak et al., ICLR 2023; SEMPPL-SPEC section 11, from the abstract), ImageNet top-1 % fine-tuned.
#: The paper's epoch count is not visible; the recipes train 300 epochs, PAWS's best setting (spec 9).
SEMPPL: tuple[Cell, ...] = (
    *_cells("semppl", "ResNet-50", "semppl_r50", "finetune", {300: (68.5, 76.0)}, method="SemPPL"),
    *_cells(
        "semppl", "ResNet-50 + SK", "", "finetune", {300: (72.3, 78.3)}, method="SemPPL", unavailable=NO_SK
    ),
)

TABLES: dict[str, tuple[Cell, ...]] = {"table1": TABLE1, "table2": TABLE2, "semppl": SEMPPL}

TITLES: dict[str, str] = {
    "table1": "Table 1: ResNet-50 on ImageNet, top-1 %",
    "table2": "Table 2: wider ResNet-50s on ImageNet, fine-tuned top-1 %",
    "semppl": "ImageNet results: ResNet-50, fine-tuned top-1 %",
}

#: The paper each table comes from (the report's heading) and where its numbers were typed from.
PAPERS: dict[str, str] = {"table1": "PAWS", "table2": "PAWS", "semppl": "SemPPL"}
SOURCES: dict[str, str] = {
    "table1": "Assran et al., ICCV 2021 (PAWS-SPEC.md section 8)",
    "table2": "Assran et al., ICCV 2021 (PAWS-SPEC.md section 8)",
    "semppl": "Bosnjak et al., ICLR 2023, abstract (SEMPPL-SPEC.md section 11)",
}


def table_cells(table: str) -> tuple[Cell, ...]:
    """The cells of ``table`` ("table1", "table2" or "semppl"); a clear error otherwise."""
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; reproducible tables: {', '.join(TABLES)}") from None
