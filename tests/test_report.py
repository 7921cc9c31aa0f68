"""`paws report`: every plotted series equals the JSONL it came from (read back from the figures' data), the page
references only files that exist, 2-run comparisons and killed runs are reported, and no text overlaps."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from rich.console import Console
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config import load_settings
from paws_cli.report.command import write_report
from paws_cli.report.figures import FIGURE_FILES, Plot, build_figures, eval_values
from paws_cli.report.runs import RunData, legend_labels, load_run, read_jsonl
from paws_cli.train.loop import train

QUIET = Console(quiet=True)


# -- hand-written run directories ------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict[str, Any]], torn: str | None = None) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + (torn or ""))


def _paws_run(
    folder: Path, lr: float, *, steps: int = 12, torn: str | None = None, finished: bool = True
) -> Path:
    """A PAWS run directory as `paws pretrain` + `paws knn-eval` leave it, with made-up but distinct values."""
    folder.mkdir(parents=True)
    settings = {
        "provenance": {"git_commit": "abc"},
        "method": "paws",
        "optim": {"lr": lr, "epochs": 2.0, "batch_size": 64},
        "run": {"name": folder.name, "out_dir": str(folder.parent)},
        "paws": {"tau": 0.1},
    }
    (folder / "resolved_config.yaml").write_text(yaml.safe_dump(settings))
    records = []
    for i in range(1, steps + 1):
        records.append(
            {
                "step": 5 * i,
                "epoch": (5 * i) // 30,
                "lr": lr * (0.001 + i / steps),  # spans more than 1.5 decades
                "loss": 1.0 / i - 0.3 + lr,
                "ce": 2.3 - 0.1 * i,
                "me_max_kl": 0.05 + 0.001 * i,
                "target_confidence": 0.2 + 0.05 * i,
                "support_accuracy": min(1.0, 0.1 * i * lr),
                "images_per_s": 200.0 + i,
                "data_wait_share": 0.01 * i,
            }
        )
    _write_jsonl(folder / "metrics.jsonl", records, torn)
    _write_jsonl(folder / "epochs.jsonl", [{"epoch": 0, "step": 30, "complete": True, "loss": 0.5}])
    if finished:
        (folder / "checkpoint.pt").write_bytes(b"stand-in")
        knn = {"paws_nn_top1": 70.0 + lr, "knn_top1": 68.5 + lr, "classifier_top1": None}
        (folder / "knn_eval.json").write_text(json.dumps(knn))
    return folder


def _finetune_run(folder: Path, pretrained: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "resolved_config.yaml").write_text(yaml.safe_dump({"method": "paws", "finetune": {"lr": 0.01}}))
    _write_jsonl(
        folder / "metrics.jsonl", [{"step": 5 * i, "lr": 0.01 / i, "loss": 2.0 / i} for i in (1, 2, 3)]
    )
    history = [
        {"epoch": e, "step": 5 * e, "loss": 1.0, "train_accuracy": 20.0 * e, "heldout_top1": h}
        for e, h in ((1, 40.0), (2, 55.0), (3, 50.0))
    ]
    _write_jsonl(folder / "epochs.jsonl", history)
    result = {"pretrained": str(pretrained / "checkpoint.pt"), "selected_epoch": 2, "test_top1": 52.5}
    (folder / "finetune.json").write_text(json.dumps(result | {"history": history}))
    return folder


def _jsonl_series(path: Path, key: str, x: str = "step") -> list[tuple[float, float]]:
    """What the figure must show for ``key``: the log's records that hold it, read independently of the code."""
    lines = path.read_text().split("\n")
    out = []
    for line in lines[:-1]:  # the text after the last newline is a torn write
        record = json.loads(line)
        if key in record:
            out.append((float(record[x]), float(record[key])))
    return out


def _lines_by_run(plots: list[Plot]) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    """(figure file, axes key, run name) -> the plotted points, read back from the figures."""
    out = {}
    for plot in plots:
        for ax in plot.figure.axes:
            for line in ax.lines:
                out[(plot.filename, ax.get_label(), line.get_gid())] = [tuple(p) for p in line.get_xydata()]
    return out


def test_every_plotted_series_equals_its_jsonl(tmp_path: Path) -> None:
    a = _paws_run(tmp_path / "runs" / "lr_small", 0.5)
    b = _paws_run(tmp_path / "runs" / "lr_big", 2.0)
    ft = _finetune_run(tmp_path / "runs" / "lr_small_finetune", a)
    runs = [load_run(a), load_run(b)]
    assert [r.path for r in runs[0].finetunes] == [ft] and not runs[1].finetunes
    labels = legend_labels(runs)
    assert labels == ["optim.lr=0.5", "optim.lr=2"]
    plots = build_figures(runs, labels)
    assert [p.filename for p in plots] == list(FIGURE_FILES)
    plotted = _lines_by_run(plots)
    checked = 0
    for (filename, key, gid), points in plotted.items():
        run_dir = {"lr_small": a, "lr_big": b, "lr_small_finetune": ft}[gid.split(":")[0]]
        if filename == "selection.png":
            if gid.endswith(":test"):
                assert points == [(2.0, 52.5)]  # the selected epoch's test top-1
            else:
                assert points == _jsonl_series(run_dir / "epochs.jsonl", key, x="epoch")
        else:
            assert points == _jsonl_series(run_dir / "metrics.jsonl", key), (filename, key, gid)
        checked += 1
    keys = {key for (_, key, _) in plotted}
    assert {
        "loss",
        "ce",
        "lr",
        "images_per_s",
        "data_wait_share",
        "target_confidence",
        "heldout_top1",
    } <= keys
    assert checked == len(plotted) and checked >= 2 * 8 + 3
    # legend entries name the runs by what differs; each line carries its run's label
    losses = plots[0].figure
    assert [t.get_text() for t in losses.legends[0].get_texts()] == labels
    assert {line.get_label() for line in losses.axes[0].lines} == set(labels)


def test_bars_scales_and_labels(tmp_path: Path) -> None:
    a = _paws_run(tmp_path / "lr_small", 0.5)
    b = _paws_run(tmp_path / "lr_big", 2.0)
    _finetune_run(tmp_path / "lr_small_finetune", a)
    runs = [load_run(a), load_run(b)]
    plots = {p.filename: p.figure for p in build_figures(runs, legend_labels(runs))}
    (ax,) = plots["evaluation.png"].axes
    heights = {c.get_label(): [round(bar.get_height(), 6) for bar in c] for c in ax.containers}
    # run a: PAWS-NN, k-NN (its knn_eval.json) and fine-tuned (its fine-tuning run); run b: no fine-tuning
    assert heights == {"optim.lr=0.5": [70.5, 69.0, 52.5], "optim.lr=2": [72.0, 70.5]}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["soft-NN (PAWS-NN)", "k-NN", "fine-tuned"]
    scales = {ax.get_label(): ax.get_yscale() for ax in plots["lr.png"].axes + plots["losses.png"].axes}
    assert scales == {"lr": "log", "loss": "linear", "ce": "linear"}  # the loss goes negative
    for figure in plots.values():
        for axes in figure.axes:
            assert axes.get_xlabel() and axes.get_ylabel() and axes.get_title()


def _text_boxes(fig: Figure) -> list[Bbox]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [ax.get_tightbbox(renderer) for ax in fig.axes] + [
        leg.get_window_extent(renderer) for leg in fig.legends
    ]


def test_no_text_overlaps_or_leaves_the_figure(tmp_path: Path) -> None:
    long = ["optim.lr=0.5, paws.sharpen_T=0.25 and a very long label", "optim.lr=2, paws.sharpen_T=0.3"]
    runs = [load_run(_paws_run(tmp_path / "a", 0.5)), load_run(_paws_run(tmp_path / "b", 2.0))]
    _finetune_run(tmp_path / "a_finetune", runs[0].path)
    runs[0] = load_run(runs[0].path)
    for labels in (legend_labels(runs), long):
        for plot in build_figures(runs, labels):
            boxes = _text_boxes(plot.figure)
            page = plot.figure.bbox
            for i, box in enumerate(boxes):
                assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, plot.filename
                assert page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, plot.filename
                for other in boxes[i + 1 :]:
                    overlap = Bbox.intersection(box, other)
                    assert overlap is None or overlap.width * overlap.height < 4, plot.filename


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources += [v or "" for k, v in attrs if k == "src"]


def _img_sources(page: Path) -> list[str]:
    parser = _Images()
    parser.feed(page.read_text())
    return parser.sources


def _assert_page_is_whole(page: Path) -> None:
    sources = _img_sources(page)
    assert sources, page
    for src in sources:
        assert "/" not in src and (page.parent / src).is_file(), src  # relative, beside the page
    assert sorted(p.name for p in page.parent.glob("*.png")) == sorted(sources)  # nothing stale either
    assert not list(page.parent.glob(".*.tmp*"))


def test_two_run_comparison_page(tmp_path: Path) -> None:
    a = _paws_run(tmp_path / "runs" / "a<b>&c", 0.5)  # a name HTML must escape
    b = _paws_run(tmp_path / "runs" / "b", 2.0)
    out = tmp_path / "cmp"
    page = write_report([a, b], out)
    assert page == out / "index.html"
    _assert_page_is_whole(page)
    text = page.read_text()
    assert "a&lt;b&gt;&amp;c" in text and "a<b>" not in text
    assert "<td>optim.lr</td><td>0.5</td><td>2</td>" in text  # the settings that differ, and only those
    assert "optim.epochs" not in text and "provenance" not in text
    # a second report into the same folder without the evaluation data removes the stale figure
    (a / "knn_eval.json").unlink()
    (b / "knn_eval.json").unlink()
    write_report([a, b], out)
    assert not (out / "evaluation.png").exists()
    _assert_page_is_whole(page)


def test_killed_run_with_a_torn_last_line(tmp_path: Path) -> None:
    torn = '{"step": 65, "epoch": 2, "lr": 0.1, "lo'
    run_dir = _paws_run(tmp_path / "killed", 0.5, torn=torn, finished=False)
    log = read_jsonl(run_dir / "metrics.jsonl")
    assert len(log.records) == 12 and log.torn_last_line and log.skipped == 1
    run = load_run(run_dir)
    assert "no checkpoint yet" in run.status() and "torn last log line" in run.status()
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    page = run_dir / "report" / "index.html"  # the default folder of a one-run report
    assert str(page) in result.output.replace("\n", "")
    _assert_page_is_whole(page)
    assert "evaluation.png" not in _img_sources(page)  # no results yet: no evaluation figure
    plotted = _lines_by_run(build_figures([run], legend_labels([run])))
    assert plotted[("losses.png", "loss", "killed")] == _jsonl_series(run_dir / "metrics.jsonl", "loss")
    assert max(x for x, _ in plotted[("lr.png", "lr", "killed")]) == 60.0  # step 65 was torn


def test_report_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "is not a run directory" in result.output
    run_dir = _paws_run(tmp_path / "a", 0.5)
    result = runner.invoke(app, ["report", str(run_dir), str(run_dir)])
    assert result.exit_code == 2 and "named twice" in result.output
    empty = tmp_path / "started"
    empty.mkdir()
    (empty / "resolved_config.yaml").write_text("method: paws\n")  # a run that has not logged a step yet
    page = write_report([empty])
    assert "No logged values yet" in page.read_text() and _img_sources(page) == []


def test_report_of_a_real_tiny_run(tiny_overrides: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(
            load_settings("fmnist_demo", [*tiny_overrides, "optim.epochs=1"], environ={}), console=QUIET
        )
    finally:
        torch.set_num_threads(threads)
    page = write_report([result.run_dir])
    _assert_page_is_whole(page)
    assert set(_img_sources(page)) == {"losses.png", "lr.png", "throughput.png", "health.png"}
    run: RunData = load_run(result.run_dir)
    plotted = _lines_by_run(build_figures([run], [run.name]))
    for key in ("loss", "ce", "lr", "images_per_s", "data_wait_share", "target_confidence", "me_max_kl"):
        figure = next(f for f, k, _ in plotted if k == key)
        assert plotted[(figure, key, "tiny")] == _jsonl_series(result.run_dir / "metrics.jsonl", key), key
    assert all(0.0 <= y <= 1.0 for _, y in plotted[("throughput.png", "data_wait_share", "tiny")])


@pytest.mark.parametrize(
    "values, log", [([1e-4, 0.5, 0.0], True), ([0.1, 0.5], False), ([-1.0, 100.0], False)]
)
def test_log_scale_rule(values: list[float], log: bool) -> None:
    from paws_cli.report.figures import spans_decades

    assert spans_decades(values) is log


def test_finetunes_are_found_from_another_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finetune.json names its checkpoint relative to where fine-tuning ran (runs/x/checkpoint.pt)."""
    a = _paws_run(tmp_path / "runs" / "x", 0.5)
    ft = _finetune_run(tmp_path / "runs" / "x_finetune", a)
    doc = json.loads((ft / "finetune.json").read_text())
    doc |= {"pretrained": "runs/x/checkpoint.pt", "run_dir": "runs/x_finetune"}
    (ft / "finetune.json").write_text(json.dumps(doc))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert [r.path for r in load_run(a).finetunes] == [ft]


def test_demo_ends_with_the_report_of_its_runs(tiny_overrides: list[str]) -> None:
    from paws_cli.demo import run_demo

    semppl = ["semppl.labelled_batch.classes_per_batch=4", "semppl.queue_size=64", "semppl.num_negatives=6"]
    short = ["run.max_steps=12", "run.num_threads=1", "finetune.epochs=2", "run.name=demo"]
    results = run_demo("fmnist_demo", [*tiny_overrides, *semppl, *short], QUIET)
    out_dir = Path(next(o for o in tiny_overrides if o.startswith("run.out_dir=")).split("=", 1)[1])
    page = Path(str(results["report"]))
    assert page == out_dir / "demo" / "report" / "index.html"
    _assert_page_is_whole(page)
    assert set(_img_sources(page)) == set(FIGURE_FILES)
    runs = [load_run(out_dir / name) for name in ("demo", "demo_semppl", "demo_supervised")]
    assert [len(r.finetunes) for r in runs] == [1, 1, 0]
    # the numbers drawn are the demo's own
    shown = [eval_values(r) for r in runs]
    assert shown[0]["soft-NN (PAWS-NN)"] == results["paws_nn"]["top1"]  # type: ignore[index]
    assert shown[0]["fine-tuned"] == results["paws_finetuned"]["top1"]  # type: ignore[index]
    assert shown[1]["fine-tuned"] == results["semppl_finetuned"]["top1"]  # type: ignore[index]
    assert shown[2]["linear classifier"] == results["supervised_only"]["top1"]  # type: ignore[index]
    plots = {p.filename: p.figure for p in build_figures(runs, legend_labels(runs))}
    health = {ax.get_label() for ax in plots["health.png"].axes}
    assert {"target_confidence", "pseudo_label_accuracy", "valid_positives", "train_accuracy"} <= health
    selection = {line.get_gid() for ax in plots["selection.png"].axes for line in ax.lines}
    assert {"demo_finetune", "demo_semppl_finetune"} <= selection


def test_a_failing_demo_report_is_a_warning(tmp_path: Path) -> None:
    from paws_cli.demo import _write_report

    run_dir = _paws_run(tmp_path / "a", 0.5)
    (tmp_path / "taken").write_text("a file where the report folder would go")
    console = Console(record=True, width=200)
    assert _write_report([run_dir], tmp_path / "taken", console) is None
    assert "the demo's report was not written" in console.export_text()
