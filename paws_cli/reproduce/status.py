"""Whether a step of the plan is finished, from the files it leaves (so a re-run skips finished steps).

- ``convert``: the .beton and its sidecar exist, the sidecar matches the .beton (sample count, byte size) and
  the source folder still holds the same files (the sidecar's content hash of names and sizes). A .beton made
  from other files is an error, never silently reused or overwritten.
- ``splits``: ``labelled.txt`` and ``val.txt`` exist.
- ``pretrain``: ``checkpoint.pt`` holds the last step of the run's schedule (its own settings and sampler state
  give the step count), for the planned number of epochs. A checkpoint short of it is *partial*: the runner
  continues it with ``--resume``.
- ``knn``: ``knn_eval.json`` exists and is newer than the checkpoint it evaluates.
- ``finetune``: ``finetune.json`` exists, says ``complete`` and is newer than the pretraining checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from paws_cli.reproduce.plan import Plan, Step

State = Literal["done", "partial", "todo"]


@dataclass(frozen=True)
class StepStatus:
    """A step's state and a short explanation (shown by the dry run and the runner)."""

    state: State
    detail: str = ""


def _override(step: Step, key: str) -> str | None:
    """The value a step's command line gives to settings key ``key`` (the last one wins)."""
    value = None
    for arg in step.argv:
        if arg.startswith(f"{key}="):
            value = arg.split("=", 1)[1]
    return value


def _image_files(root: Path) -> list[tuple[str, int]]:
    """(``<class>/<file>``, size in bytes) of every image under ``root``'s class folders, as ImageFolder sees them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    out = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        for folder, _dirs, names in os.walk(cls, followlinks=True):
            for name in names:
                if name.lower().endswith(IMG_EXTENSIONS):
                    path = Path(folder) / name
                    out.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return out


def _convert_status(step: Step) -> StepStatus:
    from paws_cli.data.backends.sidecar import hash_sources, read_sidecar, sidecar_path

    beton = step.result
    if not beton.exists() and not sidecar_path(beton).exists():
        return StepStatus("todo")
    sidecar = read_sidecar(beton)  # a missing or inconsistent half raises, naming the file and the fix
    assert step.source is not None
    source = step.source
    if not source.is_dir():
        raise FileNotFoundError(f"{source} (the ImageNet train folder) does not exist; check --imagenet")
    skipped = {str(s["file"]) for s in sidecar.skipped}
    files = [(rel, size) for rel, size in _image_files(source) if rel not in skipped]
    recorded = sidecar.content_hash.get("sources")
    # Compared on the files the conversion wrote: names and byte sizes (the sidecar's own hash).
    written = {f for f in sidecar.files}
    mine = [(rel, size) for rel, size in files if rel in written]
    if len(mine) != len(written) or hash_sources(mine) != recorded:
        raise ValueError(
            f"{beton} exists but was not converted from the files now in {source} (its sidecar index lists "
            f"{len(written)} images; the folder holds {len(files)} image files, or their sizes "
            f"changed). Remove {beton} and {sidecar_path(beton)} to convert again, or point --work elsewhere"
        )
    extra = len(files) - len(mine)
    if extra:
        raise ValueError(
            f"{source} holds {extra} image file(s) that {beton} lacks (added after the conversion?). Remove "
            f"{beton} and {sidecar_path(beton)} to convert again"
        )
    return StepStatus("done", f"{sidecar.num_images} images")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        # mmap: only the few small entries read below are paged in, even for a 375M-parameter model.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for damaged files; all mean the same here
        raise ValueError(
            f"cannot read the checkpoint {path} ({type(exc).__name__}: {exc}); remove {path.parent} to "
            "train that run again"
        ) from None


def total_steps(state: dict[str, Any]) -> int:
    """The number of steps of the run a training checkpoint belongs to (as the training loop computes it)."""
    order = state["data"]["unlabelled"]
    global_batch = int(order["batch_size"]) * int(order["world_size"])
    images = int(order["num_images"])
    per_epoch = images // global_batch if int(order["drop_last"]) else math.ceil(images / global_batch)
    return max(round(float(state["settings"]["optim"]["epochs"]) * per_epoch), 1)


def _pretrain_status(step: Step) -> StepStatus:
    path = step.result
    if not path.is_file():
        return StepStatus("todo")
    state = _load_checkpoint(path)
    planned = _override(step, "optim.epochs")
    epochs = float(state["settings"]["optim"]["epochs"])
    if planned is not None and not math.isclose(float(planned), epochs):
        raise ValueError(
            f"{path} belongs to a run of {epochs:g} epochs, but this plan trains {planned}; remove "
            f"{path.parent} or point --work elsewhere"
        )
    step_now, total = int(state["step"]), total_steps(state)
    if step_now >= total:
        return StepStatus("done", f"{step_now} steps")
    return StepStatus("partial", f"checkpoint at step {step_now} of {total}; continues with --resume")


def _newer(result: Path, than: Path) -> bool:
    return than.is_file() and result.stat().st_mtime >= than.stat().st_mtime


def _json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _eval_status(step: Step, plan: Plan) -> StepStatus:
    if not step.result.is_file():
        return StepStatus("todo")
    doc = _json(step.result)
    pretrain = plan.step(step.needs[0]).result
    if doc is None:
        return StepStatus("todo", f"{step.result} is unreadable; runs again")
    if not _newer(step.result, pretrain):
        return StepStatus("todo", f"{step.result} is older than {pretrain}; runs again")
    if step.kind == "finetune" and not doc.get("complete"):
        return StepStatus("partial", "fine-tuning stopped early; continues with --resume")
    key = "paws_nn_top1" if step.kind == "knn" else "test_top1"
    value = doc.get(key)
    return StepStatus("done", f"top-1 {value:.2f}%" if isinstance(value, (int, float)) else "")


def step_status(step: Step, plan: Plan) -> StepStatus:
    """Whether ``step`` is finished (see the module doc); errors name the file that is in the way."""
    if step.kind == "convert":
        return _convert_status(step)
    if step.kind == "splits":
        done = step.result.is_file() and (step.result.parent / "val.txt").is_file()
        return StepStatus("done" if done else "todo")
    if step.kind == "pretrain":
        return _pretrain_status(step)
    return _eval_status(step, plan)
