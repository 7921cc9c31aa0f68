"""`paws report RUN [RUN ...] [--out DIR]`: one HTML page and the PNGs it shows, for one run or several overlaid.

Default folder: ``RUN/report/`` for one run, ``./paws_report/`` for several. The page is ``index.html``; the
figures are written atomically beside it (a browser open on an earlier report never reads a half-written PNG),
and figures of an earlier report that have no data now are removed, so the folder holds what the page shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from paws_cli.io_utils import atomic_path, atomic_write_text
from paws_cli.report.figures import FIGURE_FILES, Plot, build_figures, eval_values
from paws_cli.report.html import Section, details, paragraph, render_page, table_html
from paws_cli.report.runs import RunData, differing_settings, legend_labels, load_run

PAGE = "index.html"
#: Where a report of several runs goes when --out is not given (relative to the working directory).
MULTI_RUN_DEFAULT = Path("paws_report")


def default_out(run_dirs: Sequence[Path]) -> Path:
    """RUN/report for one run, ./paws_report for several."""
    return run_dirs[0] / "report" if len(run_dirs) == 1 else MULTI_RUN_DEFAULT


def save_png(plot: Plot, folder: Path, dpi: int = 110) -> Path:
    """Write the plot's figure as folder/filename, atomically."""
    target = folder / plot.filename
    with atomic_path(target) as tmp:
        plot.figure.savefig(tmp, format="png", dpi=dpi)
    return target


def _runs_table(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    rows = []
    for run, label in zip(runs, labels, strict=True):
        last = run.steps.records[-1] if run.steps.records else {}
        loss = last.get("loss")
        rows.append(
            [
                label,
                str(run.path),
                run.kind,
                run.method or "-",
                len(run.steps.records),
                loss if isinstance(loss, float) else "-",
                run.status(),
            ]
        )
    header = ["run", "directory", "kind", "method", "logged steps", "last loss", "state"]
    return table_html(header, rows)


def _eval_table(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    found = [eval_values(r) for r in runs]
    groups = list(dict.fromkeys(g for values in found for g in values))
    if not groups:
        return ""
    rows = [[label, *(v.get(g, "-") for g in groups)] for label, v in zip(labels, found, strict=True)]
    return table_html(["run", *(f"{g} top-1 %" for g in groups)], rows)


def _settings_section(runs: Sequence[RunData], labels: Sequence[str]) -> Section:
    if len(runs) == 1:
        run = runs[0]
        text = (run.path / "resolved_config.yaml").read_text() if run.settings else ""
        body = details("resolved_config.yaml", text) if text else paragraph("no resolved_config.yaml yet")
        return Section("Settings", body=body)
    rows = differing_settings(runs)
    if not rows:
        return Section("Settings that differ", body=paragraph("The runs' resolved settings are the same."))
    header = ["setting", *labels]
    return Section(
        "Settings that differ",
        caption="Only the resolved settings whose values differ ('-': the run has no such key, e.g. another "
        "method's section); where the run lives (run.name, run.out_dir) is left out.",
        body=table_html(header, [[key, *values] for key, values in rows]),
    )


def build_page(runs: Sequence[RunData], plots: Sequence[Plot], labels: Sequence[str]) -> str:
    """The HTML page of ``runs`` showing ``plots`` (already saved beside it)."""
    names = ", ".join(r.name for r in runs)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = [
        f"Written by `paws report` on {now} from what the run directories held then (a run still training "
        "shows its progress so far: run the command again to refresh)."
    ]
    sections = [Section("Runs", body=_runs_table(runs, labels)), _settings_section(runs, labels)]
    evals = _eval_table(runs, labels)
    for plot in plots:
        body = evals if plot.filename == "evaluation.png" else ""
        sections.append(Section(plot.title, image=plot.filename, caption=plot.caption, body=body))
    if not plots:
        sections.append(Section("Figures", body=paragraph("No logged values yet: nothing to plot.")))
    return render_page(f"paws report: {names}", intro, sections)


def write_report(run_dirs: Sequence[Path], out: Path | None = None) -> Path:
    """Read the runs, draw the figures, write them and the page into ``out``; return the page's path."""
    if not run_dirs:
        raise ValueError("paws report: name at least one run directory, e.g. paws report runs/fmnist_demo")
    resolved = [p.resolve() for p in run_dirs]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"paws report: a run directory is named twice in {[str(p) for p in run_dirs]}")
    runs = [load_run(Path(p)) for p in run_dirs]
    folder = out or default_out(list(run_dirs))
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file; choose a folder for the report")
    folder.mkdir(parents=True, exist_ok=True)
    labels = legend_labels(runs)
    plots = build_figures(runs, labels)
    for plot in plots:
        save_png(plot, folder)
    for stale in set(FIGURE_FILES) - {p.filename for p in plots}:
        (folder / stale).unlink(missing_ok=True)
    page = folder / PAGE
    atomic_write_text(page, build_page(runs, plots, labels))
    return page


def report_command(run_dirs: Sequence[Path], out: Path | None, console: Console) -> Path:
    """The CLI's entry: write the report and print where it is."""
    page = write_report(run_dirs, out)
    console.print(f"report: {page}", highlight=False, markup=False)
    return page
