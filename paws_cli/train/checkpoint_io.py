"""Checkpoints as plain data (tensors, numbers, strings, lists, dicts): loadable with weights_only=True.

Writes go to a temporary file that is fsynced and renamed, so a crash or a full disk never damages the previous
checkpoint. Loading model weights is strict: missing/unexpected keys and shape mismatches are listed, never
silently re-initialised (the reference's behaviour).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paws_cli.io_utils import atomic_path

FORMAT = "paws-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what is wrong."""


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Atomically write `state` (plus format tags) to `path`.

    A failed write (full disk, quota, I/O error) leaves the previous file at `path` untouched and raises a
    CheckpointError that says so.
    """
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **state}
    try:
        # Through a Python file object: a failed write then raises OSError with its errno (torch's own file
        # writer reports a full disk as an opaque "unexpected pos" RuntimeError).
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            torch.save(payload, fh)
    except (OSError, RuntimeError) as exc:
        cause = _os_error_in(exc)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        raise CheckpointError(
            f"could not write checkpoint '{path}' ({reason}); "
            + ("the previous checkpoint there is intact" if path.exists() else "no checkpoint was written")
            + ". Free disk space or fix the folder's permissions, then continue with --resume."
        ) from exc
    return path


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: torch.save's zip writer, failing to finish the file after a write error,
    raises a RuntimeError of its own with the OSError only as its context."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a toolkit checkpoint on the CPU with weights_only=True; clear errors for every failure."""
    path = Path(path)
    if not path.is_file():
        hint = " (a run directory? pass its checkpoint.pt)" if path.is_dir() else ""
        raise CheckpointError(f"checkpoint '{path}' does not exist{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt/pickled-object files
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read ({type(exc).__name__}): it is truncated or corrupt, or not a "
            f"paws checkpoint. {_fallback_hint(path)}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not a paws checkpoint (no format tag '{FORMAT}'); released suncet checkpoints are "
            "not supported by this command yet"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format version {state.get('version')}, expected {VERSION}"
        )
    return state


def _fallback_hint(path: Path) -> str:
    """What to do about an unreadable checkpoint, naming a checkpoint that exists beside it, or saying none does."""
    others = sorted(
        (p for p in path.parent.glob("checkpoint*.pt") if p != path and p.is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    if others:
        return (
            f"The newest other checkpoint in {path.parent} is '{others[-1]}': copy it over '{path.name}' to go "
            "back to it, or start again with --overwrite."
        )
    return f"No other checkpoint exists in {path.parent}: start the run again with --overwrite."


def check_state(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError listing every missing key, unexpected key and shape mismatch (if any): the one
    state-dict check of the toolkit (resume, evaluation, fine-tuning, export, released checkpoints)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(expected[k].shape) != tuple(given[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")
            parts.append(f"{len(items)} {title}: {shown}")
    raise CheckpointError(
        f"weights in {source} do not fit the model ({'; '.join(parts)}); nothing was loaded. The checkpoint was "
        "made with another architecture or settings (check model.* in its resolved_config.yaml), or is damaged."
    )


def load_state_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict that lists every missing key, unexpected key and shape mismatch in one error."""
    check_state(module.state_dict(), state_dict, source)
    module.load_state_dict(state_dict, strict=True)
