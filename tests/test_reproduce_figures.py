"""`paws reproduce` reports draw ours against the paper's numbers (a pair of bars per published cell) and, for
Table 1, fine-tuned top-1 against pretraining epochs beside the paper's Figure 1 points; the Markdown report
references the PNGs, which exist beside it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from paws_cli.reproduce.figures import bars_figure, epochs_figure
from paws_cli.reproduce.paper import TABLE1
from paws_cli.reproduce.plan import PlanOptions, build_plan
from paws_cli.reproduce.report import write_report


def _smoke_plan(tmp_path: Path):  # type: ignore[no-untyped-def]
    options = PlanOptions("table1", "smoke", tmp_path / "work" / "smoke_imagenet", tmp_path / "work",
                          tmp_path / "reports", "folder")  # fmt: skip
    return build_plan(options)


def _write_results(tmp_path: Path) -> dict[tuple[int, str, str], float]:
    """Result files for three cells (the others stay 'not run'); {(epochs, fraction, metric): ours}."""
    ours = {(100, "10%", "finetune"): 71.25, (300, "10%", "finetune"): 74.5, (300, "10%", "paws_nn"): 70.0}
    for (epochs, fraction, metric), value in ours.items():
        name = f"r50_{fraction.rstrip('%')}pct_e{epochs}"
        path, key = (
            (tmp_path / f"work/runs/{name}_finetune/finetune.json", "test_top1")
            if metric == "finetune"
            else (tmp_path / f"work/runs/{name}/knn_eval.json", "paws_nn_top1")
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({key: value, "complete": True}))
    return ours


def test_markdown_report_shows_figures_that_exist(tmp_path: Path) -> None:
    plan = _smoke_plan(tmp_path)
    _write_results(tmp_path)
    md, _ = write_report(plan)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())
    assert images == ["table1_smoke_bars.png", "table1_smoke_epochs.png"]
    for name in images:
        assert (md.parent / name).is_file() and (md.parent / name).stat().st_size > 1000
    assert not list(md.parent.glob(".*.tmp*"))


def test_bars_and_epoch_points_are_the_numbers(tmp_path: Path) -> None:
    plan = _smoke_plan(tmp_path)
    ours = _write_results(tmp_path)
    _, results = write_report(plan)
    (ax,) = bars_figure(results, "t").axes
    paper, mine = ax.containers
    assert [b.get_width() for b in paper] == [c.paper_top1 for c in TABLE1]  # one bar per published cell
    assert [b.get_width() for b in mine] == [
        ours[(r.planned.cell.epochs, r.planned.cell.fraction, r.planned.cell.metric)]
        for r in results
        if r.ours is not None
    ]
    missing = [t.get_text() for t in ax.texts if t.get_text().startswith("ours")]
    assert missing == ["ours: not run"] * (len(TABLE1) - len(ours))

    figure = epochs_figure(results)
    assert figure is not None
    by_panel = {
        ax.get_label(): {line.get_gid(): line.get_xydata().tolist() for line in ax.lines}
        for ax in figure.axes
    }
    # Figure 1 (10% labels): the paper's PAWS points are Table 1's fine-tuned 10% column
    assert by_panel["10%"]["paper"] == [[100, 73.9], [200, 75.0], [300, 75.5]]
    assert by_panel["10%"]["ours"] == [[100, 71.25], [300, 74.5]]  # only runs with a result, fine-tuned only
    assert by_panel["1%"]["paper"] == [[100, 63.8], [200, 66.1], [300, 66.5]] and by_panel["1%"]["ours"] == []


def test_no_epochs_figure_without_table1_cells(tmp_path: Path) -> None:
    options = PlanOptions("table2", "smoke", tmp_path / "work" / "smoke_imagenet", tmp_path / "work",
                          tmp_path / "reports", "folder")  # fmt: skip
    md, results = write_report(build_plan(options))
    assert epochs_figure(results) is None
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text()) == ["table2_smoke_bars.png"]
