"""Output readable at 80 columns and when piped: the training bar, `paws recipes ls` and `paws settings`.

Everything is rendered with a fixed console width; nothing a user copies or reads (names, numbers, ETA) may be cut
with an ellipsis.
"""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.finetune.progress import finetune_epoch_text
from paws_cli.reproduce.recipe_table import listed_recipes
from paws_cli.train.progress import TrainProgress, _Display

STATS = {"loss": -0.1605, "me_max_kl": 0.1203}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _terminal(width: int) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(width=width, file=buf, force_terminal=True, color_system=None), buf


def _frame(progress: TrainProgress, width: int) -> list[str]:
    """The bar as drawn on a terminal ``width`` columns wide."""
    console, buf = _terminal(width)
    console.print(_Display(progress))
    return ANSI.sub("", buf.getvalue()).rstrip("\n").split("\n")


@pytest.mark.parametrize("width", [60, 80, 100, 200])
def test_bar_keeps_steps_stats_and_eta_whole_at_any_width(width: int) -> None:
    console, _ = _terminal(width)
    progress = TrainProgress(console, total=123456, start=0)
    progress.update(2000, STATS, 0.1234, 2048.0)
    lines = _frame(progress, width)
    text = "\n".join(lines)
    assert "…" not in text
    assert all(len(line) <= width for line in lines), lines
    assert "2000/123456" in text and "ETA " in text and re.search(r"ETA \d+:\d\d:\d\d", text)
    assert "loss -0.1605 | me-max 0.120 | lr 0.123 | 2048 img/s" in text
    # a wide console keeps one line; at 80 columns the statistics go below a bar of useful width
    assert len(lines) == (1 if width >= 100 else 2)
    assert "━" in lines[0] or "╸" in lines[0] or " " in lines[0]


def test_bar_of_a_time_budgeted_run_counts_steps_and_the_budget_left() -> None:
    console, _ = _terminal(80)
    progress = TrainProgress(console, total=None, start=0, budget_left_s=3600.0)
    progress.update(40, {"loss": 2.3}, 0.1, 50.0)
    text = "\n".join(_frame(progress, 80))
    assert "step 40" in text and "/?" not in text
    eta = re.search(r"ETA (\d+):(\d\d):(\d\d) \(budget\)", text)
    assert eta and 3500 < int(eta[1]) * 3600 + int(eta[2]) * 60 + int(eta[3]) <= 3600


def test_live_bar_redraws_and_prints_epoch_lines_above_it() -> None:
    console, buf = _terminal(80)
    with TrainProgress(console, total=100, start=0) as progress:
        progress.update(50, STATS, 0.5, 100.0)
        progress.epoch_summary(0, {"loss": 1.25})
        progress.update(100, STATS, 0.25, 100.0)
    out = ANSI.sub("", buf.getvalue())
    assert "epoch 0: loss 1.2500" in out
    assert "100/100" in out and "…" not in out


def test_piped_output_prints_plain_lines_at_most_every_few_seconds_and_at_the_end() -> None:
    buf = io.StringIO()
    console = Console(width=80, file=buf, force_terminal=False)
    with TrainProgress(console, total=30, start=0, plain_every_s=3600.0) as progress:
        for step in (10, 20, 30):
            progress.update(step, {"loss": 1.0 / step}, 0.1, 64.0)
    lines = buf.getvalue().splitlines()
    # the first report and the last step; the middle one falls inside the interval
    assert len(lines) == 2, lines
    assert lines[0].startswith("train 10/30 loss 0.1000 | lr 0.1 | 64 img/s | 0:00:00 ETA ")
    assert lines[1].startswith("train 30/30 loss 0.0333") and lines[1].endswith("ETA 0:00:00")
    assert "━" not in buf.getvalue() and "\x1b" not in buf.getvalue()  # no bar drawn into the pipe


def test_piped_output_every_report_when_the_interval_is_zero() -> None:
    buf = io.StringIO()
    console = Console(width=80, file=buf, force_terminal=False)
    with TrainProgress(console, total=None, start=0, plain_every_s=0.0, budget_left_s=10.0) as progress:
        for step in (5, 10, 15):
            progress.update(step, {"loss": 1.0}, 0.1, 64.0)
    lines = buf.getvalue().splitlines()
    assert [line.split(" loss")[0] for line in lines] == ["train step 5", "train step 10", "train step 15"]
    assert all("(budget)" in line for line in lines)


def test_piped_output_ends_with_the_step_a_budget_stopped_at() -> None:
    buf = io.StringIO()
    console = Console(width=80, file=buf, force_terminal=False)
    with TrainProgress(console, total=None, start=0, plain_every_s=3600.0, budget_left_s=10.0) as progress:
        for step in (5, 10, 15):
            progress.update(step, {"loss": 1.0}, 0.1, 64.0)
    lines = buf.getvalue().splitlines()
    assert [line.split(" loss")[0] for line in lines] == ["train step 5", "train step 15"]
    quiet = io.StringIO()
    with TrainProgress(Console(file=quiet, force_terminal=False), total=None, start=7, budget_left_s=1.0):
        pass  # no step trained (a resumed run whose budget was spent): nothing to report
    assert quiet.getvalue() == ""


def test_disabled_progress_prints_nothing() -> None:
    buf = io.StringIO()
    console = Console(width=80, file=buf, force_terminal=False)
    with TrainProgress(console, total=10, start=0, enabled=False) as progress:
        progress.update(10, {"loss": 1.0}, 0.1, 1.0)
        progress.epoch_summary(0, {"loss": 1.0})
    assert buf.getvalue() == ""


def test_finetune_epochs_update_the_bar_instead_of_printing_a_line_each() -> None:
    buf = io.StringIO()
    console = Console(width=80, file=buf, force_terminal=False)
    text = finetune_epoch_text(50)
    with TrainProgress(
        console, total=500, start=0, label="finetune", epoch_text=text, plain_every_s=0.0
    ) as progress:
        for epoch in range(1, 4):
            progress.update(epoch * 10, {"loss": 2.0}, 0.01, 300.0)
            progress.epoch_summary(epoch, {"loss": 2.0, "train_accuracy": 40.0 + epoch, "heldout_top1": 35.0})
    out = buf.getvalue()
    assert "epoch 1:" not in out  # no per-epoch lines
    # each step's line carries the epoch before it; the last line, written at the end, the final epoch
    assert out.splitlines()[-2].startswith("finetune 30/500 loss 2.0000 | lr 0.01 | 300 img/s | epoch 2/50: ")
    assert out.splitlines()[-1].startswith("finetune 30/500 loss 2.0000 | lr 0.01 | 300 img/s | epoch 3/50: ")
    assert "epoch 3/50: train 43.0%, held-out 35.0%" in out.splitlines()[-1]
    lines = _frame(progress, 80)
    assert "epoch 3/50: train 43.0%, held-out 35.0%" in "\n".join(lines)
    assert all(len(line) <= 80 for line in lines) and "…" not in "\n".join(lines)


# ------------------------------------------------------------------------------------- recipes ls, settings


def _cli(monkeypatch: pytest.MonkeyPatch, width: int, *args: str) -> list[str]:
    """Run `paws ARGS` with the command line's console ``width`` columns wide (as a pipe with COLUMNS set)."""
    import paws_cli.cli as cli

    monkeypatch.setattr(cli, "console", Console(width=width, soft_wrap=True))
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def _squash(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("width", [80, 200])
def test_recipes_ls_never_cuts_names_or_numbers(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    from paws_cli.reproduce.recipe_table import recipe_row

    lines = _cli(monkeypatch, width, "recipes", "ls")
    text = "\n".join(lines)
    assert "…" not in text
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    cells = [re.split(r"\s*[│┃]\s*", line.strip(" │┃")) for line in lines]
    for name in listed_recipes():
        row = recipe_row(name)
        if width == 80:  # blocks: the name alone on its line, its numbers whole on the lines below
            assert name in [line.strip() for line in lines]
            block = text.split(f"\n{name}\n", 1)[1].split("\n\n", 1)[0]
            for number in (
                f"batch {row.global_batch}",
                f"world {row.world_size}",
                f"support {row.global_support}",
            ):
                assert number in block.splitlines()[0] or number in block.splitlines()[1], (name, number)
            assert row.schedule in block
            assert _squash(row.description) in _squash(block)
        else:  # a table row: every cell whole
            row_cells = next(c for c in cells if c and c[0] == name)
            assert row_cells[1:7] == [
                row.model,
                row.labels,
                str(row.world_size),
                str(row.global_batch),
                row.global_support,
                row.schedule,
            ]


@pytest.mark.parametrize("width", [80, 160])
def test_settings_descriptions_wrap_and_keys_stay_whole(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    from paws_cli.config import setting_paths

    lines = _cli(monkeypatch, width, "settings", "--recipe", "fmnist_demo")
    text = "\n".join(lines)
    assert "…" not in text
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    if width == 80:
        heads = {line.split(" = ", 1)[0] for line in lines if " = " in line and not line.startswith(" ")}
        assert set(setting_paths()) <= heads
        assert "optim.lr = 1.0" in lines and 'method = "paws"' in lines
        for info in setting_paths().values():  # every description, all its words, in order
            assert _squash(info.description or "") in _squash(text)
    else:
        keys = {re.split(r"\s*│\s*", line.strip(" │"))[0] for line in lines if line.startswith("│")}
        assert set(setting_paths()) <= keys
