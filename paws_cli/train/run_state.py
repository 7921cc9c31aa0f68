"""A training run's checkpoint: the one function that builds its state, and the one that restores it.

A checkpoint holds everything an exact resume needs: settings, model, optimiser, loss scaler, the samplers'
positions, the labelled subset, the method's own state (queues), RNG states, the step counter and the partial
sums of an epoch cut short. Everything is plain data (``weights_only=True`` loads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from paws_cli.config import Settings
from paws_cli.config.paths import absolute_path_tree
from paws_cli.config.trees import flatten_keys, lookup, upgrade_saved_tree
from paws_cli.data.needs import needs_of
from paws_cli.data.sources import TrainDataLike
from paws_cli.methods import Method
from paws_cli.train.checkpoint_io import CheckpointError, load_checkpoint, load_state_strict

#: Settings that may differ on resume (everything else must match the checkpoint's).
RESUMABLE_CHANGES = ("run.", "eval.", "slurm.", "finetune.", "data.num_workers")


def per_process_sizes(settings: Settings) -> tuple[str, ...]:
    """Per-process sizes that may change on resume together with the number of processes, provided the global
    batch stays the same (the samplers check that and name what differs)."""
    needs = needs_of(settings)
    shape = needs.support or needs.labelled_sub_batch
    if shape is None:
        return ("optim.batch_size",)
    return ("optim.batch_size", f"{shape.section}.classes_per_batch", f"{shape.section}.images_per_class")


def checkpoint_state(
    *,
    settings: Settings,
    method: Method,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    data: TrainDataLike,
    step: int,
    epoch: int,
    epoch_done: bool,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint of a run after ``step`` steps (``extra``: the loop's own counters)."""
    return {
        "method": settings.method,
        "settings": settings.model_dump(mode="json"),
        "model": getattr(model, "module", model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "method_state": method.state_dict(),
        "data": _at_position(data.state_dict(), epoch, step - epoch * data.steps_per_epoch),
        "labelled": data.labelled.clone(),
        "world_size": data.order.world_size,
        "rng": {
            "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(data.device)} if data.device.type == "cuda" else {}),
        },
        "step": step,
        "epoch": epoch,
        "epoch_complete": epoch_done,
        **extra,
    }


def _at_position(state: dict[str, Any], epoch: int, position: int) -> dict[str, Any]:
    """Sampler states placed at the batches actually trained: a prefetching loader may have drawn ahead."""
    return {
        name: {**part, "epoch": epoch, "position": position}
        if isinstance(part, dict) and "position" in part
        else part
        for name, part in state.items()
    }


def restore_checkpoint(
    path: Path,
    *,
    settings: Settings,
    method: Method,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    data: TrainDataLike,
) -> dict[str, Any]:
    """Restore everything from ``path``; return the checkpoint (its step is where training continues)."""
    state = load_checkpoint(path)
    saved_world = int(state["data"]["unlabelled"]["world_size"])
    check_same_settings(path, state["settings"], settings, world_changed=saved_world != data.order.world_size)
    if not torch.equal(state["labelled"], data.labelled):
        raise CheckpointError(f"cannot resume from {path}: the labelled subset differs from the checkpoint's")
    load_state_strict(getattr(model, "module", model), state["model"], str(path))
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    try:
        method.load_state_dict(state.get("method_state") or {})
    except ValueError as exc:
        raise CheckpointError(f"cannot resume from {path}: {exc}") from None
    try:
        data.load_state_dict(state["data"])
    except ValueError as exc:
        hint = ""
        if saved_world != data.order.world_size:
            hint = f" (settings: {', '.join(per_process_sizes(settings))}, per process)"
        raise CheckpointError(f"cannot resume from {path}: {exc}{hint}") from None
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and data.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], data.device)
    return state


def check_same_settings(
    path: Path, saved_tree: dict[str, Any], settings: Settings, *, world_changed: bool
) -> None:
    """A resume must train what the checkpoint trained: only run/eval/slurm/finetune settings (and, with another
    process count, the per-process sizes) may differ."""
    saved = Settings.model_validate(upgrade_saved_tree(saved_tree)).model_dump(mode="json")
    saved = absolute_path_tree(saved)  # checkpoints of earlier versions recorded paths as given
    now = settings.model_dump(mode="json")
    free = RESUMABLE_CHANGES + (per_process_sizes(settings) if world_changed else ())
    keys = dict.fromkeys(flatten_keys(now) + flatten_keys(saved))
    changed = [key for key in keys if not key.startswith(free) and lookup(saved, key) != lookup(now, key)]
    if changed:
        raise CheckpointError(
            f"cannot resume from {path}: these settings differ from the checkpoint's: {', '.join(changed)}. "
            "Resume with the run's resolved_config.yaml as --recipe, or start a new run."
        )
