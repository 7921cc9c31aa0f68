"""Training progress: a live bar on a terminal, plain lines in logs and pipes; epoch summaries as lines.

On a terminal the bar redraws in place and fits the console's width: steps, elapsed time and ETA are never cut;
when the statistics (loss, me-max, lr, images/s) do not fit beside a bar of useful width they go on a second
line. When the output is not a terminal (a pipe, a log file, a SLURM job), a live bar would only be drawn once at
the end, so a plain line is printed instead every ``plain_every_s`` seconds (and at the last step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from types import TracebackType

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

#: A bar narrower than this says little: the statistics move to a second line instead.
MIN_BAR = 10
#: Wider bars add nothing (rich's default width).
MAX_BAR = 40
#: Formats an epoch's summary for the bar itself (instead of a printed line per epoch).
EpochText = Callable[[int, dict[str, float]], str]


def clock(seconds: float | None) -> str:
    """'0:01:23' (hours unbounded), or '-:--:--' when unknown."""
    if seconds is None:
        return "-:--:--"
    return str(timedelta(seconds=max(int(seconds), 0)))


class TrainProgress:
    """Progress of a training run; a no-op when disabled (other ranks, run.progress=false).

    total: the step the run stops at, or None when a time budget decides (then ``budget_left_s``, the seconds of
    budget left when the run starts, gives the ETA). epoch_text: when given, epoch summaries update the bar's
    text instead of printing a line each (fine-tuning's many short epochs).
    """

    def __init__(
        self,
        console: Console,
        total: int | None,
        start: int,
        enabled: bool = True,
        *,
        label: str = "train",
        budget_left_s: float | None = None,
        epoch_text: EpochText | None = None,
        plain_every_s: float = 30.0,
    ) -> None:
        self.console = console
        self.enabled = enabled
        self.label = label
        self.total = total
        self.start = self.step = start
        self.stats = ""
        self.epoch = ""
        self.budget_left_s = budget_left_s
        self.epoch_text = epoch_text
        self.plain_every_s = plain_every_s
        self._started = time.perf_counter()
        self._last_plain: float | None = None
        self._plain_shown: tuple[int, str, str] | None = None  # (step, stats, epoch) of the last plain line
        self._live: Live | None = None

    @property
    def live(self) -> bool:
        """A bar redrawn in place (a terminal); otherwise plain lines."""
        return self.enabled and self.console.is_terminal and not self.console.is_dumb_terminal

    def __enter__(self) -> TrainProgress:
        self._started = time.perf_counter()
        if self.live:
            self._live = Live(_Display(self), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(kind, exc, tb)
            self._live = None
        elif self.enabled and self.step > self.start and self._plain_shown != self._state():
            # A log's last line tells where the run ended: the final epoch's text, or the step a time budget
            # stopped at before the next timed line was due.
            self._plain_line(force=True)

    def _state(self) -> tuple[int, str, str]:
        return self.step, self.stats, self.epoch

    def update(self, step: int, values: dict[str, float], lr: float, images_per_s: float) -> None:
        """The run reached ``step``; ``values`` are the logged means (loss, me_max_kl, ...)."""
        shown = [f"loss {values['loss']:.4f}"] if "loss" in values else []
        if "me_max_kl" in values:
            shown.append(f"me-max {values['me_max_kl']:.3f}")
        shown += [f"lr {lr:.3g}", f"{images_per_s:.0f} img/s"]
        self.step, self.stats = step, " | ".join(shown)
        if self.enabled and not self.live:
            self._plain_line()

    def epoch_summary(self, epoch: int, values: dict[str, float]) -> None:
        """An epoch ended: a line (pretraining), or the bar's epoch text (``epoch_text``)."""
        if not self.enabled:
            return
        if self.epoch_text is not None:
            self.epoch = self.epoch_text(epoch, values)
            return
        text = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
        self.console.print(f"epoch {epoch}: {text}", highlight=False)

    def times(self) -> tuple[float, float | None]:
        """(seconds since the progress started, estimated seconds left or None)."""
        elapsed = time.perf_counter() - self._started
        if self.budget_left_s is not None:
            return elapsed, max(self.budget_left_s - elapsed, 0.0)
        done = self.step - self.start
        if self.total is None or done <= 0:
            return elapsed, None
        return elapsed, elapsed / done * max(self.total - self.step, 0)

    def steps_text(self) -> str:
        return f"{self.step}/{self.total}" if self.total is not None else f"step {self.step}"

    def time_text(self) -> str:
        elapsed, left = self.times()
        budget = " (budget)" if self.budget_left_s is not None else ""
        return f"{clock(elapsed)} ETA {clock(left)}{budget}"

    def details(self) -> str:
        """The statistics and the epoch text, as one string."""
        return " | ".join(part for part in (self.stats, self.epoch) if part)

    def _plain_line(self, force: bool = False) -> None:
        now = time.perf_counter()
        last = force or (self.total is not None and self.step >= self.total)
        if not last and self._last_plain is not None and now - self._last_plain < self.plain_every_s:
            return
        self._last_plain = now
        self._plain_shown = self._state()
        details = self.details()
        self.console.print(
            f"{self.label} {self.steps_text()}"
            + (f" {details}" if details else "")
            + f" | {self.time_text()}",
            markup=False,
            highlight=False,
            soft_wrap=True,  # one line per report in logs, whatever the width
        )


class _Display:
    """The live bar, laid out for the width it is drawn at."""

    def __init__(self, progress: TrainProgress) -> None:
        self.progress = progress

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        p = self.progress
        width = options.max_width
        fixed = [Text(p.label, style="bold"), Text(p.steps_text()), Text(p.time_text())]
        details = Text(p.details())
        used = sum(t.cell_len for t in fixed) + len(fixed)  # one space between cells
        one_line = not details.plain or width - used - details.cell_len - 1 >= MIN_BAR
        bar_width = width - used - (details.cell_len + 1 if one_line and details.plain else 0)
        yield from _row(
            p, fixed, details if one_line and details.plain else None, min(max(bar_width, 1), MAX_BAR)
        )
        if not one_line:
            details.overflow = "fold"  # long statistics wrap; nothing is cut
            yield Text("  ") + details


def _row(p: TrainProgress, fixed: list[Text], details: Text | None, bar_width: int) -> Iterator[Table]:
    """label, bar, steps[, details], time: one grid row."""
    bar = ProgressBar(total=p.total, completed=p.step, width=bar_width, pulse=p.total is None)
    cells: list[Text | ProgressBar] = [fixed[0], bar, fixed[1]]
    if details is not None:
        cells.append(details)
    cells.append(fixed[2])
    grid = Table.grid(padding=(0, 1))
    for cell in cells:
        grid.add_column(no_wrap=True, width=bar_width if cell is bar else None)
    grid.add_row(*cells)
    yield grid
