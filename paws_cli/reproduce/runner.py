"""Run a plan's steps in order, skipping finished ones; each step's output goes to WORK/logs/<step>.log.

A failed step does not stop the others: the steps that need it are *blocked*, the rest run, and the summary
names the log of every failure. A step that exits successfully without finishing (a SLURM submission returns at
once; the job trains later) is *waiting*: re-run the same command when the job is done.

Two executors run the same `paws` argument lists:

- :class:`SubprocessExecutor`: each step in its own process, ``python -m paws_cli ...``; multi-process steps
  (pretraining and fine-tuning at full scale) under the launcher, e.g. ``torchrun --nproc_per_node 8``;
- :class:`InProcessExecutor`: the CLI called in this process (the smoke run: it saves starting Python,
  torch and timm for each of its ~20 steps, which would cost more than the steps themselves on a small CPU).
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from paws_cli.reproduce.plan import Plan, Step
from paws_cli.reproduce.status import step_status

Outcome = Literal["skipped", "ran", "failed", "blocked", "waiting"]


class Executor(Protocol):
    """Runs ``paws ARGV`` with its output in ``log``; returns the exit status."""

    def __call__(self, argv: Sequence[str], log: Path, parallel: bool) -> int: ...


class SubprocessExecutor:
    """Each step in a child process; ``launcher`` (e.g. "torchrun --nproc_per_node 8") starts parallel steps.

    The launcher must accept ``-m MODULE ARGS`` as python and torchrun do.
    """

    def __init__(self, launcher: str | None = None) -> None:
        self.launcher = shlex.split(launcher) if launcher else None

    def command(self, argv: Sequence[str], parallel: bool) -> list[str]:
        """The full command line of one step."""
        head = self.launcher if parallel and self.launcher else [sys.executable]
        return [*head, "-m", "paws_cli", *argv]

    def __call__(self, argv: Sequence[str], log: Path, parallel: bool) -> int:
        with log.open("a") as fh:
            fh.write(f"$ {shlex.join(self.command(argv, parallel))}\n")
            fh.flush()
            return subprocess.run(
                self.command(argv, parallel), stdout=fh, stderr=subprocess.STDOUT
            ).returncode


class InProcessExecutor:
    """Each step through the Typer app in this process, its stdout and stderr redirected into the log.

    ``app`` is the `paws` Typer app (``paws_cli.cli.app``), passed in by the caller so that this module does not
    import the CLI that imports it.
    """

    def __init__(self, app: Callable[..., object]) -> None:
        self.app = app

    def __call__(self, argv: Sequence[str], log: Path, parallel: bool) -> int:
        with log.open("a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            print(f"$ {shlex.join(('paws', *argv))}", flush=True)
            try:
                result = self.app(args=list(argv), prog_name="paws", standalone_mode=False)
            except SystemExit as exc:  # click's own usage errors
                return exc.code if isinstance(exc.code, int) else 1
            except Exception:
                traceback.print_exc()
                return 1
            return result if isinstance(result, int) else 0


@dataclass(frozen=True)
class StepOutcome:
    """What happened to one step."""

    step: str
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0
    log: Path | None = None


def _last_error(log: Path) -> str:
    """The most telling line of a failed step's log: its 'error:' line, else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:") or "Error:" in line]
    return (errors or lines or [""])[-1][:400]


def _resume_flags(step: Step, partial: bool) -> list[str]:
    """--resume for a half-finished run; --overwrite for a run directory without a usable checkpoint."""
    if step.run_dir is None:
        return []
    if partial:
        return ["--resume"]
    return ["--overwrite"] if step.run_dir.exists() else []


def run_plan(plan: Plan, execute: Executor, say: Callable[[str], None]) -> list[StepOutcome]:
    """Run every unfinished step whose prerequisites are finished; return one outcome per step."""
    plan.logs.mkdir(parents=True, exist_ok=True)
    finished: set[str] = set()
    outcomes: list[StepOutcome] = []
    for index, step in enumerate(plan.steps, 1):
        where = f"[{index}/{len(plan.steps)}] {step.id}"
        status = step_status(step, plan)
        if status.state == "done":
            finished.add(step.id)
            outcomes.append(StepOutcome(step.id, "skipped", status.detail or "finished earlier"))
            say(f"{where}: finished earlier {status.detail}".rstrip())
            continue
        missing = [need for need in step.needs if need not in finished]
        if missing:
            outcomes.append(StepOutcome(step.id, "blocked", f"needs {', '.join(missing)}"))
            say(f"{where}: blocked (needs {', '.join(missing)})")
            continue
        if step.kind == "convert":  # the converter writes into an existing folder only
            step.result.parent.mkdir(parents=True, exist_ok=True)
        log = plan.logs / f"{step.id}.log"
        argv = [*step.argv, *_resume_flags(step, status.state == "partial")]
        say(f"{where}: running {step.what} (log {log})")
        start = time.perf_counter()
        code = execute(argv, log, step.parallel)
        seconds = time.perf_counter() - start
        if code != 0:
            detail = _last_error(log)
            outcomes.append(StepOutcome(step.id, "failed", detail, seconds, log))
            say(f"{where}: FAILED (exit {code}) after {seconds:.0f} s: {detail}")
            continue
        after = step_status(step, plan)
        if after.state != "done":
            detail = after.detail or f"exited without writing {step.result}"
            outcomes.append(StepOutcome(step.id, "waiting", detail, seconds, log))
            say(f"{where}: not finished yet ({detail}); run the same command again when it is")
            continue
        finished.add(step.id)
        outcomes.append(StepOutcome(step.id, "ran", after.detail, seconds, log))
        say(f"{where}: done in {seconds:.0f} s {after.detail}".rstrip())
    return outcomes
