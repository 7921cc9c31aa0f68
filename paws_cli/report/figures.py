"""The report's figures, built as :class:`matplotlib.figure.Figure` objects (no pyplot, no global state, Agg
canvas) and returned, so that tests read the plotted data back (``ax.lines[i].get_xydata()``, bar heights).

Every curve is drawn from the values of its JSONL log as they are (no smoothing, no rescaling); each line's
gid is its run directory's name and each axes' label the logged key it shows, so a reader can pair them up.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from paws_cli.report.runs import RunData


@dataclass(frozen=True)
class Panel:
    """One logged key in one axes: its title, y label (with unit) and whether a log scale may suit it."""

    key: str
    title: str
    ylabel: str
    log_ok: bool = False


@dataclass
class Plot:
    """A figure of the report: its PNG file name, heading, caption and the figure itself."""

    filename: str
    title: str
    caption: str
    figure: Figure


STEP_LABEL = "step (optimiser steps)"
#: Width of a character of the default 10-point font and of a legend entry's handle and gaps, in inches.
CHAR_IN, HANDLE_IN = 0.075, 0.8
#: Every PNG the report may write, in page order.
FIGURE_FILES = ("losses.png", "lr.png", "throughput.png", "health.png", "evaluation.png", "selection.png")

LOSS_PANELS = (
    Panel("loss", "training loss (the optimised total)", "loss (nats)", log_ok=True),
    Panel("ce", "PAWS cross-entropy, anchors vs targets", "cross-entropy (nats)", log_ok=True),
    Panel("augm", "SemPPL augmentation term", "loss (nats)", log_ok=True),
    Panel("sempos", "SemPPL semantic-positive term", "loss (nats)", log_ok=True),
    Panel("inv_augm", "SemPPL invariance penalty (augm.)", "penalty (nats)", log_ok=True),
    Panel("inv_sempos", "SemPPL invariance penalty (sem. pos.)", "penalty (nats)", log_ok=True),
)
LR_PANELS = (Panel("lr", "learning rate", "learning rate (per step)", log_ok=True),)
SPEED_PANELS = (
    Panel("images_per_s", "throughput", "unlabelled images / s", log_ok=True),
    Panel("data_wait_share", "time waiting for data", "share of step time (0-1)"),
)
HEALTH_PANELS = (
    Panel("target_confidence", "PAWS target confidence (Fig. 3c)", "mean top probability (0-1)"),
    Panel("support_accuracy", "PAWS support accuracy", "leave-one-out accuracy (0-1)"),
    Panel("me_max_kl", "PAWS me-max KL(mean target || uniform)", "KL (nats)"),
    Panel("pseudo_label_accuracy", "SemPPL pseudo-label accuracy", "share correct (0-1)"),
    Panel("valid_positives", "SemPPL valid positives", "share of anchors (0-1)"),
    Panel("vote_agreement", "SemPPL k-NN vote agreement", "share of votes (0-1)"),
    Panel("train_accuracy", "supervised training accuracy", "accuracy on the batch (0-1)"),
)

#: Evaluation numbers shown as bars: (result file, key, bar group name).
EVAL_BARS = (
    ("knn", "paws_nn_top1", "soft-NN (PAWS-NN)"),
    ("knn", "knn_top1", "k-NN"),
    ("knn", "classifier_top1", "linear classifier"),
    ("finetune", "test_top1", "fine-tuned"),
)


def color_of(index: int) -> str:
    """The colour of the index-th run, the same in every figure."""
    return f"C{index % 10}"


def spans_decades(values: Sequence[float], decades: float = 1.5) -> bool:
    """True when no value is negative and the positive ones span more than ``decades`` decades (zeros, such as
    the last step of a cosine to 0, are left out of a log-scaled axes)."""
    positive = [v for v in values if v > 0]
    if len(positive) < 2 or min(values) < 0:
        return False
    return math.log10(max(positive) / min(positive)) > decades


def new_figure(panels: int, *, ncols: int = 3, legend_rows: int = 0) -> tuple[Figure, list]:
    """A constrained-layout figure with ``panels`` axes on a grid (unused cells removed)."""
    ncols = max(1, min(ncols, panels))
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows + 0.3 * legend_rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        fig.delaxes(ax)
    return fig, axes[:panels]


def add_run_legend(fig: Figure, labels: Sequence[str], colors: Sequence[str]) -> None:
    """One legend for the whole figure, below the axes, naming the runs (none for a single run). Labels are
    wrapped to the figure's width and laid out in as many columns as fit (a legend never leaves the PNG)."""
    if len(labels) < 2:
        return
    width = fig.get_figwidth()
    chars = max(12, int((width - HANDLE_IN) / CHAR_IN))  # characters a label line may hold
    wrapped = [textwrap.fill(label, chars) for label in labels]
    longest = max(len(line) for label in wrapped for line in label.splitlines())
    ncols = max(1, min(len(labels), int(width // (longest * CHAR_IN + HANDLE_IN))))
    handles = [Line2D([], [], color=c, label=lab) for lab, c in zip(wrapped, colors, strict=True)]
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False)


def curves_figure(
    runs: Sequence[RunData], labels: Sequence[str], panels: Sequence[Panel], *, x_label: str = STEP_LABEL
) -> Figure | None:
    """One axes per panel with data in some run, one line per run (its metrics.jsonl values against step);
    None when no run logged any of the panels' keys."""
    present = [p for p in panels if any(r.series(p.key)[0] for r in runs)]
    if not present:
        return None
    fig, axes = new_figure(len(present), legend_rows=math.ceil(len(runs) / 3) if len(runs) > 1 else 0)
    for ax, panel in zip(axes, present, strict=True):
        ax.set_label(panel.key)
        everything: list[float] = []
        for i, run in enumerate(runs):
            xs, ys = run.series(panel.key)
            if not xs:
                continue
            marker = "o" if len(xs) <= 12 else None
            (line,) = ax.plot(xs, ys, color=color_of(i), label=labels[i], marker=marker, markersize=3)
            line.set_gid(run.name)
            everything += ys
        ax.set_title(panel.title, fontsize="medium")
        ax.set_xlabel(x_label)
        ax.set_ylabel(panel.ylabel)
        if panel.log_ok and spans_decades(everything):
            ax.set_yscale("log", nonpositive="mask")
        ax.grid(alpha=0.3)
    add_run_legend(fig, labels, [color_of(i) for i in range(len(runs))])
    return fig


def selection_figure(finetunes: Sequence[tuple[RunData, str, str]]) -> Figure | None:
    """The fine-tuning runs' held-out (selection) top-1 per epoch, the selected epoch's test top-1 as a star,
    and their training accuracy; ``finetunes`` holds (run, legend label, colour)."""
    with_curve = [(r, lab, c) for r, lab, c in finetunes if r.series("heldout_top1", source="epochs")[0]]
    if not with_curve:
        return None
    fig, (held, train) = new_figure(2, legend_rows=1 if len(with_curve) > 1 else 0)
    held.set_label("heldout_top1")
    train.set_label("train_accuracy")
    for run, label, color in with_curve:
        xs, ys = _epoch_series(run, "heldout_top1")
        (line,) = held.plot(xs, ys, color=color, marker="o", markersize=3, label=label)
        line.set_gid(run.name)
        result = run.finetune or {}
        epoch, test = result.get("selected_epoch"), result.get("test_top1")
        if isinstance(epoch, (int, float)) and isinstance(test, (int, float)):
            (star,) = held.plot([epoch], [test], color=color, marker="*", markersize=12, linestyle="none")
            star.set_gid(f"{run.name}:test")
            held.annotate(f"test {test:.1f}", (epoch, test), textcoords="offset points", xytext=(-9, 0),
                          ha="right", va="center", fontsize="small", color=color)  # fmt: skip
        xs, ys = _epoch_series(run, "train_accuracy")
        if xs:
            (line,) = train.plot(xs, ys, color=color, marker="o", markersize=3, label=label)
            line.set_gid(run.name)
    held.set_title("held-out top-1 (selects the epoch; star: test)", fontsize="medium")
    train.set_title("fine-tuning training accuracy", fontsize="medium")
    for ax, what in ((held, "top-1 accuracy (%)"), (train, "accuracy (%)")):
        ax.margins(y=0.1)  # room for the stars and their labels inside the axes
        ax.set_xlabel("fine-tuning epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    add_run_legend(fig, [lab for _, lab, _ in with_curve], [c for _, _, c in with_curve])
    return fig


def _epoch_series(run: RunData, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for record in run.epochs.records:
        x, y = record.get("epoch"), record.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(y, bool):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def eval_values(run: RunData) -> dict[str, float]:
    """The evaluation numbers of ``run`` by bar group: its knn_eval.json, and the test top-1 of its own
    finetune.json or of the (first) fine-tuning run of its checkpoint."""
    docs = {
        "knn": run.knn or {},
        "finetune": run.finetune or (run.finetunes[0].finetune if run.finetunes else {}),
    }
    out = {}
    for source, key, group in EVAL_BARS:
        value = (docs[source] or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[group] = float(value)
    return out


def eval_figure(runs: Sequence[RunData], labels: Sequence[str]) -> Figure | None:
    """Top-1 on the test set as grouped bars: one group per evaluation, one bar per run that has it."""
    values = [eval_values(r) for r in runs]
    groups = [g for _, _, g in EVAL_BARS if any(g in v for v in values)]
    if not groups:
        return None
    fig, (ax,) = new_figure(1, legend_rows=1 if len(runs) > 1 else 0)
    fig.set_size_inches(max(4.6, 1.0 + 0.9 * len(groups) * len(runs)), 3.8)
    ax.set_label("evaluation")
    width = 0.8 / len(runs)
    for i, (run, found) in enumerate(zip(runs, values, strict=True)):
        xs = [g + (i - (len(runs) - 1) / 2) * width for g, name in enumerate(groups) if name in found]
        heights = [found[name] for name in groups if name in found]
        if not xs:
            continue
        bars = ax.bar(xs, heights, width * 0.95, color=color_of(i), label=labels[i], gid=run.name)
        ax.bar_label(bars, fmt="%.1f", fontsize="small", padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlabel("evaluation of the pretrained network")
    ax.set_ylabel("top-1 accuracy on the test set (%)")
    ax.set_ylim(0, 105)
    ax.set_title("evaluation results found in the run directories", fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    add_run_legend(fig, labels, [color_of(i) for i in range(len(runs))])
    return fig


def build_figures(runs: Sequence[RunData], labels: Sequence[str]) -> list[Plot]:
    """Every figure the runs have data for, in page order."""
    finetunes: list[tuple[RunData, str, str]] = []
    named = {r.path.resolve() for r in runs}
    for i, run in enumerate(runs):
        if run.kind == "finetune":
            finetunes.append((run, labels[i], color_of(i)))
        for ft in run.finetunes:  # found beside a pretraining run; shown once when also named
            if ft.path.resolve() not in named:
                suffix = " fine-tuned" if len(run.finetunes) == 1 else f" ({ft.name})"
                finetunes.append((ft, f"{labels[i]}{suffix}", color_of(i)))
    candidates = [
        ("losses.png", "Loss and its terms", curves_figure(runs, labels, LOSS_PANELS),
         "Per logged step (run.log_every), the values of metrics.jsonl; a log scale where a curve spans decades."),
        ("lr.png", "Learning rate", curves_figure(runs, labels, LR_PANELS),
         "The learning rate each logged step used (log scale when it spans more than 1.5 decades)."),
        ("throughput.png", "Speed and data loading", curves_figure(runs, labels, SPEED_PANELS),
         "Unlabelled images per second and the share of step time spent waiting for the next batch, both "
         "averaged over the session so far (a resumed run starts again)."),
        ("health.png", "Health signals", curves_figure(runs, labels, HEALTH_PANELS),
         "PAWS: a target confidence stuck near 1/classes, or a support accuracy at chance, signals collapse "
         "(the paper's Figure 3). SemPPL: pseudo-label accuracy and the share of anchors with a valid "
         "semantic positive."),
        ("evaluation.png", "Evaluation", eval_figure(runs, labels),
         "From knn_eval.json (paws knn-eval, the demo) and finetune.json (test top-1 at the selected epoch)."),
        ("selection.png", "Fine-tuning: held-out selection", selection_figure(finetunes),
         "Held-out top-1 per fine-tuning epoch (epochs.jsonl); the best epoch is selected and scored once on "
         "the test set (star)."),
    ]  # fmt: skip
    return [Plot(name, title, caption, fig) for name, title, fig, caption in candidates if fig is not None]
