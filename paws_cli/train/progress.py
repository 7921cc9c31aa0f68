"""A rich progress bar for training: loss, me-max, lr, images/s and ETA; epoch summaries as lines."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """Context manager around rich.Progress; a no-op when disabled (other ranks, --no-progress)."""

    def __init__(self, console: Console, total: int | None, start: int, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, stats="")

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.__exit__(kind, exc, tb)

    def update(self, step: int, values: dict[str, float], lr: float, images_per_s: float) -> None:
        shown = [f"loss {values['loss']:.4f}"] if "loss" in values else []
        if "me_max_kl" in values:
            shown.append(f"me-max {values['me_max_kl']:.3f}")
        shown += [f"lr {lr:.3g}", f"{images_per_s:.0f} img/s"]
        self._progress.update(self._task, completed=step, stats=" | ".join(shown))

    def epoch_summary(self, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
        self._progress.console.print(f"epoch {epoch}: {text}")
