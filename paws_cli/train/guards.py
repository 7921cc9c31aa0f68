"""What can end or undo a step, each one object the loop calls once a step: a non-finite loss, a spent time
budget, and Ctrl-C / SIGTERM (finish the step, checkpoint, exit 130)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
from rich.console import Console


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, the lr and the last good checkpoint."""


class TrainingInterruptedError(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved; the CLI exits 130."""

    def __init__(self, message: str, checkpoint: Path) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class NonFiniteGuard:
    """Skips at most ``limit`` steps whose loss is not finite over the whole run (resumes included).

    A step that may be skipped must be undoable: its forward updates BatchNorm's running statistics, so they are
    saved before the forward (``snapshot``) and put back when the step is skipped.
    """

    def __init__(self, limit: int, skipped: int, console: Console, show: bool) -> None:
        self.limit, self.skipped = limit, skipped
        self.console, self.show = console, show
        self.last_good: Path | None = None  # the checkpoint this run can go back to
        self._saved: list[torch.Tensor] = []

    def snapshot(self, model: torch.nn.Module) -> None:
        may_skip = self.skipped < self.limit
        self._saved = [b.detach().clone() for b in model.buffers()] if may_skip else []

    def skip(
        self, bad: float, model: torch.nn.Module, loss: torch.Tensor, where: tuple[int, int, int], lr: float
    ) -> bool:
        """False for a finite loss; True when this non-finite step is skipped; raises when none may be.
        ``where`` is (step, epoch, rank)."""
        if not bad:
            return False
        if self.skipped >= self.limit:
            after = (
                f" after skipping {self.skipped} (run.skip_nonfinite_steps={self.limit})"
                if self.skipped
                else ""
            )
            step, epoch, rank = where
            raise NonFiniteLossError(
                f"the loss is {loss.item()} at step {step} (epoch {epoch}, lr {lr:.4g}) on rank {rank} (or another "
                f"process){after}; last good checkpoint: {self.last_good or 'none yet'} (kept). Lower optim.lr or "
                "check the data, then continue from it with --resume, or allow a few bad steps with "
                "run.skip_nonfinite_steps=N."
            )
        # Skipped on every process alike (the flag is all-reduced): no update, statistics restored.
        self.skipped += 1
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), self._saved, strict=True):
                buffer.copy_(saved)
        if self.show:
            self.console.print(
                f"[yellow]warning: non-finite loss at step {where[0]} (lr {lr:.4g}); step skipped "
                f"({self.skipped} of run.skip_nonfinite_steps={self.limit})[/]"
            )
        return True


class BudgetClock:
    """Wall-clock time spent training, continued across resumes (``run.time_budget_s`` runs follow it)."""

    def __init__(self, budget_s: float | None, already_s: float) -> None:
        self.budget_s = budget_s
        self._start = time.perf_counter() - already_s

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def progress(self, elapsed: float) -> float:
        """Share of the budget spent, in [0, 1]."""
        return min(elapsed / self.budget_s, 1.0) if self.budget_s else 0.0

    def spent(self, elapsed: float) -> bool:
        return self.budget_s is not None and elapsed >= self.budget_s


class StopSignals:
    """While active, SIGINT and SIGTERM only set ``requested``: the loop finishes its step, checkpoints and stops.

    A second Ctrl-C while the first is being handled stops at once (KeyboardInterrupt). Handlers that others
    installed (submitit's SIGTERM requeue, a debugger) are left alone, and nothing is installed off the main
    thread.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = 0.0  # a float: it joins the per-step all-reduce, so every process stops at one step
        self.name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.name = 1.0, signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            current = signal.getsignal(sig)
            if current in (signal.SIG_DFL, signal.default_int_handler):
                self._previous[sig] = current
                signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
