"""`paws export CHECKPOINT OUT`: the backbone alone with timm key names, loadable strictly by timm.

``timm.create_model(NAME, num_classes=0, in_chans=C, checkpoint_path=OUT)`` loads the file with strict key
checking (after ``import paws_cli.models`` for the toolkit's own names such as ``resnet50x2`` or ``cnn_w16``;
``resnet50x1`` weights also load into timm's ``resnet50``). Formats:

- ``safetensors``: OUT must end in ``.safetensors`` (timm picks the reader by the extension); the tensors are the
  backbone's state dict, the metadata names the architecture and the source.
- ``timm``: a torch file ``{"state_dict": backbone, "arch": NAME, "in_chans": C, ...}``; timm reads its
  ``state_dict`` entry.

``--with-projection`` adds the first projection layer (Linear + BN; the ReLU has no weights) with keys
``fc.*``/``bn.*``: under ``"projection"`` in the timm file, and in ``<OUT stem>.projection.safetensors`` beside a
safetensors file, so that the backbone file itself still loads strictly into a timm model without a head.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import Tensor

import paws_cli.models
from paws_cli.io_utils import atomic_path
from paws_cli.pretrained import PretrainedWeights, load_pretrained
from paws_cli.train.checkpoint_io import check_state

FORMATS = ("safetensors", "timm")


def timm_backbone_state(weights: PretrainedWeights) -> tuple[str, dict[str, Tensor]]:
    """(timm model name, backbone state dict) after a strict key/shape check against that timm model."""
    name, in_chans = weights.architecture.backbone, weights.architecture.in_chans
    state = weights.part("backbone.")
    with torch.device("meta"):  # keys and shapes only: no memory, no initialisation
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    check_state(model.state_dict(), state, f"the backbone of {weights.path} as timm '{name}'")
    return name, {k: v.contiguous() for k, v in state.items()}


def projection_layer_state(weights: PretrainedWeights) -> dict[str, Tensor]:
    """The first projection layer (``fc.*`` Linear, ``bn.*`` BatchNorm) of ``weights``."""
    state = weights.part("projection.first.")
    if not state:
        raise ValueError(
            f"{weights.path} has no projection head (e.g. the supervised baseline); export without --with-projection"
        )
    return {k: v.contiguous() for k, v in state.items()}


def projection_path(out: Path) -> Path:
    """Where a safetensors export puts the projection layer: ``<OUT stem>.projection.safetensors``."""
    return out.with_name(f"{out.stem}.projection.safetensors")


def _check_out(out: Path, fmt: str, *, with_projection: bool = False, overwrite: bool = False) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "safetensors" and out.suffix != ".safetensors":
        raise ValueError(
            f"--format safetensors: '{out}' must end in .safetensors (timm chooses its reader by it)"
        )
    if fmt == "timm" and out.suffix == ".safetensors":
        raise ValueError(
            f"--format timm writes a torch file; '{out}' must not end in .safetensors (e.g. use .pth)"
        )
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder of '{out}' does not exist; create it first")
    if out.is_dir():
        raise ValueError(
            f"'{out}' is a folder; give the output file's name, e.g. {out / 'backbone.safetensors'}"
        )
    targets = [out, projection_path(out)] if with_projection and fmt == "safetensors" else [out]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{' and '.join(repr(p) for p in existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "pass --overwrite to replace, or choose another output file"
        )


def export_weights(
    weights: PretrainedWeights, out: Path, *, fmt: str, with_projection: bool, overwrite: bool = False
) -> list[Path]:
    """Write the export (each file atomically); return the files written. An existing file is replaced only
    with ``overwrite``."""
    _check_out(out, fmt, with_projection=with_projection, overwrite=overwrite)
    name, backbone = timm_backbone_state(weights)
    projection = projection_layer_state(weights) if with_projection else None
    info = {
        "arch": name,
        "in_chans": weights.architecture.in_chans,
        "source": str(weights.path),
        "source_kind": weights.kind,
    }
    written = [out]
    if fmt == "timm":
        payload: dict[str, object] = {"state_dict": backbone, **info}
        if projection is not None:
            payload["projection"] = projection
        with atomic_path(out) as tmp:
            torch.save(payload, tmp)
        return written
    metadata = {"format": "pt", **{k: str(v) for k, v in info.items()}}
    with atomic_path(out) as tmp:
        save_file(backbone, str(tmp), metadata=metadata)
    if projection is not None:
        head = projection_path(out)
        with atomic_path(head) as tmp:
            save_file(projection, str(tmp), metadata={**metadata, "part": "projection.first"})
        written.append(head)
    return written


def export_command(
    checkpoint: Path,
    out: Path,
    *,
    fmt: str,
    with_projection: bool,
    console: Console,
    overwrite: bool = False,
) -> list[Path]:
    """`paws export`: load any supported checkpoint, write the backbone export, print how to load it."""
    # before reading a possibly large checkpoint
    _check_out(out, fmt, with_projection=with_projection, overwrite=overwrite)
    weights = load_pretrained(checkpoint)
    written = export_weights(weights, out, fmt=fmt, with_projection=with_projection, overwrite=overwrite)
    arch = weights.architecture
    params = sum(v.numel() for v in weights.part("backbone.").values() if v.is_floating_point())
    console.print(f"exported the {arch.backbone} backbone ({params / 1e6:.2f}M values) of {checkpoint}:")
    for path in written:
        console.print(f"  {path}", highlight=False)
    registered = arch.backbone in paws_cli.models.PAWS_BACKBONES
    console.print("load it with:", highlight=False)
    lines = [
        "import timm",
        *([f"import paws_cli.models  # registers {arch.backbone} with timm"] if registered else []),
        f"model = timm.create_model({json.dumps(arch.backbone)}, num_classes=0, in_chans={arch.in_chans}, "
        f"checkpoint_path={json.dumps(str(out))})",
    ]
    for line in lines:
        console.print(f"  {line}", highlight=False, markup=False)
    return written
