"""Figures of the `paws reproduce` report: ours against the paper's number, a pair of bars per published cell,
and (Table 1) fine-tuned top-1 against pretraining epochs beside the paper's Figure 1 points.

No run evaluates during pretraining (knn-eval and fine-tuning read the final checkpoint), so each of our points
against epochs is the end of its own run (100, 200 or 300 epochs), as each of the paper's points is. Figure 1
plots ResNet-50 at 10% labels; its PAWS points are Table 1's fine-tuned 10% column (the paper's other methods in
that figure are not ours to reproduce and are left out). The 1% panel shows Table 1's 1% column the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from paws_cli.report.figures import new_figure

if TYPE_CHECKING:  # the report imports this module
    from paws_cli.reproduce.report import CellResult

PAPER_COLOR, OURS_COLOR = "0.6", "C0"


def row_label(result: CellResult) -> str:
    cell = result.planned.cell
    return f"{cell.architecture}, {cell.label}, {cell.epochs} ep, {cell.fraction}"


def bars_figure(results: Sequence[CellResult], title: str) -> Figure:
    """Horizontal bars, one pair per cell: the paper's top-1 (grey) and ours (blue); a missing value of ours is
    written where its bar would be ('not run', 'failed' or why the cell cannot be reproduced)."""
    fig, (ax,) = new_figure(1)
    fig.set_size_inches(9.0, 1.2 + 0.55 * len(results))
    ax.set_label("ours_vs_paper")
    ys = list(range(len(results)))[::-1]  # the first row at the top, as in the Markdown table
    height = 0.38
    paper = ax.barh([y + height / 2 for y in ys], [r.planned.cell.paper_top1 for r in results], height,
                    color=PAPER_COLOR, label="paper", gid="paper")  # fmt: skip
    ax.bar_label(paper, fmt="%.1f", fontsize="small", padding=2)
    found = [(y, r) for y, r in zip(ys, results, strict=True) if r.ours is not None]
    ours = ax.barh([y - height / 2 for y, _ in found], [r.ours for _, r in found], height,
                   color=OURS_COLOR, label="ours", gid="ours")  # fmt: skip
    ax.bar_label(ours, fmt="%.2f", fontsize="small", padding=2)
    for y, r in zip(ys, results, strict=True):
        if r.ours is None:
            ax.text(1, y - height / 2, f"ours: {r.missing}", va="center", fontsize="small", color="0.3")
    ax.set_yticks(ys, [row_label(r) for r in results])
    ax.set_xlim(0, 100)
    ax.set_ylim(-0.75, len(results) - 0.25)  # room for the bottom row's note above the axis
    ax.set_xlabel("top-1 accuracy on ImageNet validation (%)")
    ax.set_ylabel("published cell")
    ax.set_title(title, fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return fig


def epochs_figure(results: Sequence[CellResult]) -> Figure | None:
    """Fine-tuned ResNet-50 top-1 against pretraining epochs, one panel per label fraction: the paper's points
    (Figure 1 at 10%, Table 1 at both) as a line, ours as markers where a run has a result; None without
    Table 1's fine-tuned cells."""
    cells = [r for r in results if r.planned.cell.table == "table1" and r.planned.cell.metric == "finetune"]
    fractions = sorted(
        {r.planned.cell.fraction for r in cells}, key=lambda f: float(f.rstrip("%")), reverse=True
    )
    if not fractions:
        return None
    fig, axes = new_figure(len(fractions), ncols=2)
    for ax, fraction in zip(axes, fractions, strict=True):
        ax.set_label(fraction)
        rows = sorted(
            (r for r in cells if r.planned.cell.fraction == fraction), key=lambda r: r.planned.cell.epochs
        )
        (line,) = ax.plot([r.planned.cell.epochs for r in rows], [r.planned.cell.paper_top1 for r in rows],
                          color=PAPER_COLOR, marker="s", label="paper")  # fmt: skip
        line.set_gid("paper")
        done = [r for r in rows if r.ours is not None]
        (line,) = ax.plot([r.planned.cell.epochs for r in done], [r.ours for r in done], color=OURS_COLOR,
                          marker="o", linestyle="none", markersize=7, label="ours (one run per point)")  # fmt: skip
        line.set_gid("ours")
        source = "paper: Figure 1 = Table 1" if fraction == "10%" else "paper: Table 1"
        ax.set_title(f"{fraction} labels ({source})", fontsize="medium")
        ax.set_xlabel("pretraining epochs")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_xticks([r.planned.cell.epochs for r in rows])
        ax.grid(alpha=0.3)
    fig.suptitle("ResNet-50 on ImageNet, fine-tuned top-1 against pretraining epochs", fontsize="medium")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    return fig
