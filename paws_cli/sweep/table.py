"""The sweep's results table: one row per trial, best validation top-1 first; test top-1 of the selected trial only.

Printed with rich and written as Markdown (``sweep.md``) from the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

__all__ = ["METRIC_NAMES", "markdown_table", "rich_table", "sorted_records", "table_rows"]

METRIC_NAMES = {"paws_nn": "PAWS-NN", "knn": "k-NN", "classifier": "classifier"}
NOT_EVALUATED = "-"  # other trials' test accuracy is never computed


def sorted_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Best validation top-1 first; failed trials last; ties keep their order (the first one finished wins)."""
    ranked = sorted(
        enumerate(records),
        key=lambda ir: (ir[1].get("val_top1") is None, -(ir[1].get("val_top1") or 0.0), ir[0]),
    )
    return [r for _, r in ranked]


def table_rows(
    records: Sequence[Mapping[str, Any]], keys: Sequence[str], selected: Mapping[str, Any] | None
) -> tuple[list[str], list[list[str]]]:
    """(header, rows): rank, trial, one column per swept key, method, validation metric and top-1, test top-1."""
    header = ["rank", "trial", *keys, "method", "val metric", "val top-1 %", "test top-1 %"]
    rows = []
    for rank, rec in enumerate(sorted_records(records), start=1):
        val = rec.get("val_top1")
        test = NOT_EVALUATED
        if selected is not None and selected.get("trial") == rec["trial"]:
            test = f"{selected['test_top1']:.2f}"
        rows.append(
            [
                str(rank),
                rec["trial"],
                *(rec["swept"].get(k, "") for k in keys),
                rec.get("method", ""),
                METRIC_NAMES.get(rec.get("metric", ""), rec.get("metric", "")),
                f"{val:.2f}" if val is not None else f"failed: {rec.get('error', '')[:60]}",
                test,
            ]
        )
    return header, rows


def rich_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> Table:
    table = Table(title=title)
    for col in header:
        table.add_column(col, justify="right" if col in ("rank", "val top-1 %", "test top-1 %") else "left")
    for row in rows:
        # Text cells: values such as [0.3,1.0] are data, not rich markup
        table.add_row(*(Text(c) for c in row), style="bold" if row[-1] != NOT_EVALUATED else None)
    return table


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
