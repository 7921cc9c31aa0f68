"""The fine-tuning loop, read top to bottom: ``run_finetune`` sets the run up (``finetune.setup.set_up``), then
``train_one_epoch`` runs the steps (SGD, Nesterov, cosine to zero) and ``_end_epoch`` scores the held-out set;
``_finish`` scores the selected epoch once on the test set and writes finetune.json.

Per epoch (every ``finetune.eval_every`` epochs and at the last one) the model is scored on the held-out set;
the best epoch's weights (the latest of tied epochs) go to ``best.pt`` (the weights that were scored, not the
next epoch's) and, at the end, those weights are scored once on the test set. ``checkpoint.pt`` (model,
optimiser, step, history, settings; built by ``_checkpoint_state`` alone) is written at every epoch end and when
``run.max_steps`` or Ctrl-C / SIGTERM stops a run, so ``--resume`` continues it exactly: batches and views are
functions of the step alone. ``--resume`` of a finished run changes nothing and returns its results.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from paws_cli.collectives import max_over_processes
from paws_cli.config import Settings
from paws_cli.finetune.results import FinetuneResult
from paws_cli.finetune.setup import (
    RESUMABLE_CHANGES,
    FinetuneRun,
    check_same_finetune_settings,
    create_finetune_optimizer,
    schedule_settings,
    set_up,
)
from paws_cli.io_utils import atomic_write_text
from paws_cli.pretrained import FINETUNE_KIND, PretrainedWeights
from paws_cli.train.checkpoint_io import load_checkpoint, load_state_strict, save_checkpoint
from paws_cli.train.guards import NonFiniteLossError, TrainingInterruptedError
from paws_cli.train.process_group import barrier
from paws_cli.train.rundir import release_run_dir, run_dir_of
from paws_cli.train.step import backward_and_step

__all__ = [
    "BEST",
    "RESULTS",
    "RESUMABLE_CHANGES",
    "check_same_finetune_settings",
    "create_finetune_optimizer",
    "run_finetune",
    "schedule_settings",
    "train_one_epoch",
]

BEST = "best.pt"
RESULTS = "finetune.json"


def run_finetune(
    settings: Settings,
    weights: PretrainedWeights,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    default_name: str = "finetune",
) -> FinetuneResult:
    """Fine-tune (or linear-probe) ``weights`` on the labelled subset of ``settings.data``; see the module doc.

    resume: continue the run from its checkpoint.pt; a finished run is left as it is and its results returned.
    The run directory stays locked against other processes until this returns or raises. SIGINT/SIGTERM end
    the current step, save a checkpoint and raise TrainingInterruptedError.
    """
    try:
        run = set_up(
            settings,
            weights,
            resume=resume,
            overwrite=overwrite,
            console=console or Console(),
            name=default_name,
        )
        if run.complete:
            return _already_complete(run)
        with run.progress, run.signals:
            run.started = time.perf_counter()
            for epoch in range(run.step // run.steps_per_epoch, _epochs(run)):
                if train_one_epoch(run, epoch):
                    break
        run.close_logs()
        if run.interrupted:
            raise TrainingInterruptedError(_interrupted_message(run), run.checkpoint_path)
        return _finish(run)
    finally:
        release_run_dir(run_dir_of(settings, default_name))


def _epochs(run: FinetuneRun) -> int:
    return -(-run.total_steps // run.steps_per_epoch)  # the last epoch may be cut short (fractional epochs)


def train_one_epoch(run: FinetuneRun, epoch: int) -> bool:
    """The remaining steps of ``epoch`` (0-based); True when training must stop (run.max_steps, a signal)."""
    settings, batches = run.settings, run.batches
    epoch_end = min((epoch + 1) * run.steps_per_epoch, run.total_steps)
    while run.step < epoch_end:
        run.wrapped.train()
        x, y = batches.batch(run.step)
        lr = run.schedule.set(run.step)
        with run.autocast():
            logits = run.wrapped(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=settings.finetune.label_smoothing)
        # One collective decides for every process: any loss non-finite, a stop signal.
        bad, signalled = max_over_processes(
            [(~torch.isfinite(loss.detach())).double(), run.signals.requested]
        )
        if bad:
            raise NonFiniteLossError(
                f"the fine-tuning loss is {loss.item()} at step {run.step} (lr {lr:.4g}; here or on another "
                "process); lower finetune.lr and start again (--overwrite)"
            )
        backward_and_step(loss, run.optimizer, run.scaler)
        run.step += 1
        run.sums["loss"] += loss.item() * len(y)
        run.sums["correct"] += (logits.argmax(dim=1) == y).sum().item()
        run.sums["images"] += len(y)
        if run.step % settings.run.log_every == 0 or run.step == run.last_stop:
            _log_step(run, lr, loss.item())
        epoch_done = run.step == epoch_end
        if epoch_done:
            _end_epoch(run, epoch + 1, lr)
        run.interrupted = bool(signalled)
        stop = run.step >= run.last_stop or run.interrupted
        if run.is_main and (epoch_done or stop):
            save_checkpoint(run.checkpoint_path, _checkpoint_state(run, epoch_done=epoch_done))
        if stop:
            return True
    return False


def _log_step(run: FinetuneRun, lr: float, loss: float) -> None:
    if not run.step_log:
        return
    record = {"step": run.step, "lr": lr, "loss": round(loss, 6)}
    run.step_log.write(record)
    steps = run.step - run.first_step
    speed = run.batches.global_batch * steps / max(time.perf_counter() - run.started, 1e-9)
    run.progress.update(run.step, record, lr, speed)


def _end_epoch(run: FinetuneRun, epoch: int, lr: float) -> None:
    """The epoch's averages, its held-out score (every finetune.eval_every epochs and at the last) and log line."""
    sums, images = run.sums, max(run.sums["images"], 1)
    record = {
        "epoch": epoch,
        "step": run.step,
        "lr": lr,
        "loss": sums["loss"] / images,
        "train_accuracy": 100.0 * sums["correct"] / images,
    }
    run.sums = {key: 0.0 for key in sums}
    if epoch % run.settings.finetune.eval_every == 0 or run.step == run.total_steps:
        record.update(_select(run, epoch))
    run.history.append(record)
    if run.epoch_log:
        run.epoch_log.write(record)
        run.progress.epoch_summary(epoch, {k: v for k, v in record.items() if k not in ("epoch", "step")})


def _select(run: FinetuneRun, epoch: int) -> dict[str, float]:
    """Score the held-out set (if any); when ``is_better`` says so (finetune.select), this epoch's weights go to
    best.pt."""
    held = run.score(run.splits.heldout) if len(run.splits.heldout) else None
    scores = {} if held is None else {"heldout_top1": held["top1"], "heldout_top5": held["top5"]}
    if held is not None:
        scores["heldout_loss"] = held["loss"]
    if is_better(run.settings.finetune.select, scores, run.best):
        run.best = {"epoch": epoch, "step": run.step, **scores}
        if run.is_main:
            best = {**_checkpoint_state(run, epoch_done=True), "optimizer": None, "selection": run.best}
            save_checkpoint(run.run_dir / BEST, best)
    return scores


def is_better(select: str, scores: dict[str, float], best: dict[str, float] | None) -> bool:
    """Whether an epoch with held-out ``scores`` replaces ``best`` (the selected epoch so far, None at first).

    'accuracy': held-out top-1 at least as high (a tie goes to the later epoch, further along the schedule; small
    held-out sets tie often); 'loss': held-out cross-entropy strictly lower (the earliest minimum); 'last': every
    scored epoch replaces the previous one, so the final epoch is tested.
    """
    if best is None or select == "last":
        return True
    if select == "accuracy":
        return scores["heldout_top1"] >= best["heldout_top1"]
    if select == "loss":
        return scores["heldout_loss"] < best["heldout_loss"]
    raise ValueError(f"finetune.select must be 'accuracy', 'loss' or 'last', got {select!r}")


def _checkpoint_state(run: FinetuneRun, *, epoch_done: bool) -> dict[str, Any]:
    """The run's checkpoint after ``run.step`` steps; the one place a fine-tuning checkpoint is built."""
    return {
        "kind": FINETUNE_KIND,
        "settings": run.settings.model_dump(mode="json"),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "step": run.step,
        "epoch": run.step / run.steps_per_epoch,
        "epoch_complete": epoch_done,
        "sums": dict(run.sums),
        "history": list(run.history),
        "best": run.best,
        "rng": {"torch": torch.get_rng_state()},
        "train_indices": torch.as_tensor(run.splits.train),
        "heldout_indices": torch.as_tensor(run.splits.heldout),
        "pretrained": str(run.weights.path),
        "train_seconds": run.train_seconds(),
    }


def _interrupted_message(run: FinetuneRun) -> str:
    resolved = run.run_dir / "resolved_config.yaml"
    return (
        f"interrupted by {run.signals.name} after step {run.step} of {run.total_steps}: checkpoint saved to "
        f"{run.checkpoint_path}. Continue with the same command plus --resume, e.g. paws finetune "
        f"{run.weights.path} --recipe {resolved} --resume"
    )


def _already_complete(run: FinetuneRun) -> FinetuneResult:
    """--resume of a finished run: its stored results, nothing changed (finetune.json is written only when a
    run stopped between its last checkpoint and its results)."""
    stored = _stored_result(run)
    if run.is_main:
        run.console.print(
            f"fine-tuning run {run.run_dir} is already complete: step {run.step} of {run.total_steps} "
            f"(checkpoint {run.checkpoint_path}); "
            + (
                "nothing was changed"
                if stored
                else f"its results were missing and are written now ({RESULTS})"
            )
            + ". To fine-tune longer, raise finetune.epochs in a new run (another run.name); to start again, "
            "pass --overwrite."
        )
    return stored or _finish(run)


def _stored_result(run: FinetuneRun) -> FinetuneResult | None:
    """finetune.json of a finished run; None when it is missing or does not describe the checkpoint (a run
    stopped between its last checkpoint and its results)."""
    try:
        stored = FinetuneResult(**json.loads((run.run_dir / RESULTS).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    return stored if stored.complete and stored.steps == run.step else None


def _finish(run: FinetuneRun) -> FinetuneResult:
    """The run's result; when complete, the selected epoch's weights scored once on the test set. Rank 0
    writes it as finetune.json."""
    ft, splits, run_dir = run.settings.finetune, run.splits, run.run_dir
    result = FinetuneResult(
        pretrained=str(run.weights.path),
        pretrained_kind=run.weights.kind,
        mode=ft.mode,
        dataset=run.dataset.name,
        run_dir=str(run_dir),
        checkpoint=str(run.checkpoint_path),
        best_checkpoint=str(run_dir / BEST),
        train_images=len(splits.train),
        heldout_images=len(splits.heldout),
        heldout_source=splits.description,
        test_images=len(run.dataset.query_labels),
        epochs=ft.epochs,
        select=ft.select,
        steps=run.step,
        complete=run.step == run.total_steps,
        train_seconds=run.train_seconds(),
        history=run.history,
    )
    if result.complete and run.best is not None:
        barrier()  # rank 0 has written best.pt
        load_state_strict(run.model, load_checkpoint(run_dir / BEST)["model"], str(run_dir / BEST))
        test = run.score(None)
        result.selected_epoch = int(run.best["epoch"])
        result.heldout_top1, result.heldout_top5 = run.best.get("heldout_top1"), run.best.get("heldout_top5")
        result.test_top1, result.test_top5 = test["top1"], test["top5"]
    if run.is_main:
        atomic_write_text(run_dir / RESULTS, json.dumps(result.as_dict(), indent=2) + "\n")
    return result
