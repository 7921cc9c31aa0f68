"""Pretrained weights from any supported checkpoint, loaded strictly: shared by knn-eval, finetune and export.

Accepted files:

- ``paws``: a ``checkpoint.pt`` written by ``paws pretrain`` (settings + the method's model; encoder keys under
  ``encoder.``, e.g. the supervised baseline's ``classifier.*`` is kept aside in ``extra_state``).
- ``paws-finetune``: a ``checkpoint.pt``/``best.pt`` written by ``paws finetune`` (backbone, the kept projection
  layer and the classifier; no full projection head, so it can be exported but not nearest-neighbour evaluated).
- ``suncet``: the authors' released PAWS ``.pth.tar``: ``{'encoder': state_dict, 'epoch': ..., 'opt': ...}``
  whose keys carry a ``module.`` prefix (DDP), a ResNet-50 (x1/x2/x4, widened stem) backbone with timm's key
  names, the projection head ``fc.fc1, fc.bn1, fc.fc2, fc.bn2, fc.fc3`` and the prediction head
  ``pred.bn1, pred.fc1, pred.bn2, pred.fc2``. The architecture is read from the tensor shapes.

Every key must find its place and every tensor must fit: missing keys, unexpected keys and shape mismatches are
errors that list them (the reference silently re-initialised mismatched tensors).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from paws_cli.config import ConfigError, Settings, load_settings
from paws_cli.config.loader import load_recipe_tree
from paws_cli.config.trees import merge_trees, upgrade_saved_tree
from paws_cli.models import PAWSEncoder, create_encoder
from paws_cli.train.checkpoint_io import FORMAT, VERSION, CheckpointError, check_state

#: Model settings that define the weights' shapes: they always come from the checkpoint.
ARCHITECTURE_KEYS = ("backbone", "proj_hidden_dim", "proj_out_dim", "proj_layers", "pred_hidden_dim")
#: Checkpoint `kind` tag written by `paws finetune`.
FINETUNE_KIND = "finetune"

_SUNCET_WIDTHS = {64: "resnet50x1", 128: "resnet50x2", 256: "resnet50x4"}
_RESNET50_BLOCKS = (3, 4, 6, 3)
_SUNCET_PRED = {"bn1": "bn_in", "fc1": "fc1", "bn2": "bn1", "fc2": "fc2"}


@dataclass(frozen=True)
class EncoderArchitecture:
    """What is needed to rebuild the encoder the weights belong to."""

    backbone: str
    in_chans: int
    proj_hidden_dim: int | None
    proj_out_dim: int
    proj_layers: int
    pred_hidden_dim: int | None

    def model_settings(self) -> dict[str, Any]:
        """The `model.*` settings of this architecture."""
        return {key: getattr(self, key) for key in ARCHITECTURE_KEYS}

    def build(self) -> PAWSEncoder:
        """A randomly initialised encoder of this architecture."""
        return create_encoder(
            self.backbone,
            in_chans=self.in_chans,
            proj_hidden_dim=self.proj_hidden_dim,
            proj_out_dim=self.proj_out_dim,
            proj_layers=self.proj_layers,
            pred_hidden_dim=self.pred_hidden_dim,
        )


@dataclass
class PretrainedWeights:
    """Weights of one checkpoint with PAWSEncoder key names (``backbone.*``, ``projection.*``, ``prediction.*``)."""

    path: Path
    kind: str  # "paws", "paws-finetune" or "suncet"
    settings: dict[str, Any] | None  # the toolkit settings tree; None for released suncet checkpoints
    architecture: EncoderArchitecture
    encoder_state: dict[str, Tensor]
    extra_state: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when the state holds the whole encoder (projection and prediction heads included)."""
        return self.kind != "paws-finetune"

    def part(self, prefix: str) -> dict[str, Tensor]:
        """The entries under ``prefix`` (e.g. ``"backbone."``) with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.encoder_state.items() if k.startswith(prefix)}

    def build_encoder(self) -> PAWSEncoder:
        """The full encoder with these weights, loaded strictly, in eval mode on the CPU."""
        if not self.complete:
            raise CheckpointError(
                f"{self.path} is a fine-tuning checkpoint: it keeps the backbone and the first projection layer "
                "only, not the projection/prediction heads this needs; use the pretraining checkpoint"
            )
        return load_into_meta_built(self.architecture.build, self.encoder_state, str(self.path)).eval()


def load_into_meta_built(build: Any, state: Mapping[str, Tensor], source: str) -> torch.nn.Module:
    """Build a module with ``build()`` on the meta device, check ``state`` strictly and assign its tensors.

    Building on the meta device skips the random initialisation (seconds and gigabytes for ResNet-50x4) that
    the checkpoint overwrites anyway. Modules with non-persistent buffers are rebuilt for real instead.
    """
    with torch.device("meta"):
        module = build()
    check_state(module.state_dict(), state, source)
    module.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        module = build()
        module.load_state_dict(state, strict=True)
    return module


def _load_file(path: Path) -> Any:
    if not path.is_file():
        hint = " (a run directory? pass its checkpoint.pt)" if path.is_dir() else ""
        raise CheckpointError(f"checkpoint '{path}' does not exist{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files and for pickled objects
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read safely ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it is corrupt or truncated, or holds Python objects beyond tensors and plain containers"
        ) from None


def load_pretrained(path: str | Path) -> PretrainedWeights:
    """Read a toolkit (pretraining or fine-tuning) checkpoint or a released suncet PAWS checkpoint."""
    path = Path(path)
    raw = _load_file(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        if raw.get("version") != VERSION:
            raise CheckpointError(
                f"checkpoint '{path}' has format version {raw.get('version')}, expected {VERSION}"
            )
        if raw.get("kind") == FINETUNE_KIND:
            return _from_finetune(path, raw)
        return _from_toolkit(path, raw)
    if isinstance(raw, dict) and isinstance(raw.get("encoder"), Mapping):
        return _from_suncet(path, raw)
    keys = sorted(raw)[:10] if isinstance(raw, dict) else type(raw).__name__
    raise CheckpointError(
        f"'{path}' is neither a paws checkpoint (no format tag '{FORMAT}') nor a released PAWS checkpoint "
        f"(no 'encoder' state dict); it holds {keys}"
    )


def _first_conv_channels(state: Mapping[str, Tensor], source: str) -> int:
    for key, value in state.items():
        if key.startswith("backbone.") and value.ndim == 4:
            return int(value.shape[1])
    raise CheckpointError(f"{source}: no convolution weight in the backbone; cannot tell the input channels")


def _from_toolkit(path: Path, raw: dict[str, Any]) -> PretrainedWeights:
    model = raw.get("model")
    settings = raw.get("settings")
    if not isinstance(model, Mapping) or not isinstance(settings, Mapping):
        raise CheckpointError(f"paws checkpoint '{path}' has no 'model' weights or 'settings'; it is damaged")
    encoder = {k[len("encoder.") :]: v for k, v in model.items() if k.startswith("encoder.")}
    extra = {k: v for k, v in model.items() if not k.startswith("encoder.")}
    if not encoder:
        raise CheckpointError(
            f"paws checkpoint '{path}' holds no 'encoder.*' weights (keys: {sorted(model)[:8]})"
        )
    m = Settings.model_validate(upgrade_saved_tree(settings)).model
    has_projection = any(k.startswith("projection.") for k in encoder)
    architecture = EncoderArchitecture(
        backbone=m.backbone,
        in_chans=_first_conv_channels(encoder, str(path)),
        proj_hidden_dim=m.proj_hidden_dim,
        proj_out_dim=m.proj_out_dim,
        proj_layers=m.proj_layers if has_projection else 0,
        pred_hidden_dim=m.pred_hidden_dim if any(k.startswith("prediction.") for k in encoder) else None,
    )
    meta = {
        "method": raw.get("method"),
        "step": raw.get("step"),
        "epoch": raw.get("epoch"),
        "labelled": raw.get("labelled"),
        "labelled_source": raw.get("labelled_source"),
    }
    return PretrainedWeights(path, "paws", dict(settings), architecture, encoder, extra, meta)


def _from_finetune(path: Path, raw: dict[str, Any]) -> PretrainedWeights:
    model, settings = raw.get("model"), raw.get("settings")
    if not isinstance(model, Mapping) or not isinstance(settings, Mapping):
        raise CheckpointError(f"fine-tuning checkpoint '{path}' has no 'model' weights or 'settings'")
    # finetune.keep_projection_layers=1 keeps projection.first as ``head``; more layers keep the head's names
    # under ``head``, and keep_prediction_head the predictor as ``head.prediction`` (finetune.model.KeptProjection).
    # The first matching prefix wins.
    renamed = {
        "backbone.": "backbone.",
        "head.first.": "projection.first.",
        "head.middle.": "projection.middle.",
        "head.last.": "projection.last.",
        "head.prediction.": "prediction.",
        "head.": "projection.first.",
    }
    encoder: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    for key, value in model.items():
        prefix = next((p for p in renamed if key.startswith(p)), None)
        if prefix is None:
            extra[key] = value
        else:
            encoder[renamed[prefix] + key[len(prefix) :]] = value
    m = Settings.model_validate(upgrade_saved_tree(settings)).model
    architecture = EncoderArchitecture(
        m.backbone,
        _first_conv_channels(encoder, str(path)),
        m.proj_hidden_dim,
        m.proj_out_dim,
        m.proj_layers,
        m.pred_hidden_dim if any(k.startswith("prediction.") for k in encoder) else None,
    )
    meta = {"method": "finetune", "epoch": raw.get("epoch"), "step": raw.get("step")}
    return PretrainedWeights(path, "paws-finetune", dict(settings), architecture, encoder, extra, meta)


def _strip_module_prefix(state: Mapping[str, Tensor], source: str) -> tuple[dict[str, Tensor], str]:
    """The state without the DDP ``module.`` prefix, and the prefix that was removed (for error messages)."""
    prefixed = [k.startswith("module.") for k in state]
    if any(prefixed) and not all(prefixed):
        odd = [k for k in state if not k.startswith("module.")][:5]
        raise CheckpointError(
            f"{source}: some encoder keys have the 'module.' prefix and some do not, e.g. {odd}"
        )
    prefix = "module." if any(prefixed) else ""
    return {k[len(prefix) :]: v for k, v in state.items()}, prefix


def _suncet_backbone(state: Mapping[str, Tensor], source: str) -> tuple[str, int]:
    """(registered backbone name, input channels) of a suncet ResNet state; errors for what is not ResNet-50."""
    conv1 = state.get("conv1.weight")
    if conv1 is None or "conv1.bias" in state or not any(k.startswith("layer4.") for k in state):
        raise CheckpointError(
            f"{source}: the backbone is not a suncet ResNet (no conv1.weight/layer4, or a conv bias as in its CIFAR "
            "WRN-28-2, whose layout differs from this toolkit's wrn28_2); only the ResNet-50 x1/x2/x4 checkpoints "
            "are supported"
        )
    blocks = tuple(
        len({m.group(1) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5)
    )
    name = _SUNCET_WIDTHS.get(int(conv1.shape[0]))
    if blocks != _RESNET50_BLOCKS or name is None:
        raise CheckpointError(
            f"{source}: a ResNet with blocks per stage {blocks} and a {conv1.shape[0]}-channel stem is not a "
            "ResNet-50 x1/x2/x4 (blocks (3, 4, 6, 3), stem 64/128/256); deeper suncet models are not supported"
        )
    return name, int(conv1.shape[1])


def suncet_to_encoder_state(
    state: Mapping[str, Tensor], source: str
) -> tuple[dict[str, Tensor], EncoderArchitecture]:
    """Rename a suncet encoder state dict to PAWSEncoder keys and read its architecture from the shapes."""
    state, prefix = _strip_module_prefix(state, source)
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    fc: dict[tuple[str, int], dict[str, Tensor]] = {}
    pred_hidden: int | None = None
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "fc":
            m = re.fullmatch(r"(fc|bn)(\d+)\.(\w+)", rest)
            if m is None:
                unexpected.append(prefix + key)
                continue
            fc.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = value
        elif head == "pred":
            layer, _, param = rest.partition(".")
            if layer not in _SUNCET_PRED or not param:
                unexpected.append(prefix + key)
                continue
            out[f"prediction.{_SUNCET_PRED[layer]}.{param}"] = value
            if layer == "fc1" and param == "weight":
                pred_hidden = int(value.shape[0])
        else:
            out[f"backbone.{key}"] = value
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected key(s) in the heads: {', '.join(unexpected[:8])}; expected "
            "fc.fc<i>/fc.bn<i> (projection) and pred.bn1/fc1/bn2/fc2 (prediction)"
        )
    linears = sorted(i for kind, i in fc if kind == "fc")
    layers = len(linears)
    if layers and (linears != list(range(1, layers + 1)) or layers < 2):
        raise CheckpointError(
            f"{source}: projection head layers fc.fc{linears} are not fc.fc1..fc.fcN with N >= 2"
        )
    for (kind, i), params in fc.items():
        if kind == "bn" and not 1 <= i < layers:
            raise CheckpointError(
                f"{source}: unexpected projection BatchNorm fc.bn{i} for {layers} Linear layers"
            )
        block = "first" if i == 1 else f"middle.{i - 2}"
        target = "projection.last" if kind == "fc" and i == layers else f"projection.{block}.{kind}"
        for param, value in params.items():
            out[f"{target}.{param}"] = value
    backbone, in_chans = _suncet_backbone(state, source)
    for needed in {1, layers} if layers else ():
        if "weight" not in fc[("fc", needed)]:
            raise CheckpointError(
                f"{source}: 1 missing: {prefix}fc.fc{needed}.weight (the projection head's shape)"
            )
    architecture = EncoderArchitecture(
        backbone=backbone,
        in_chans=in_chans,
        proj_hidden_dim=int(fc[("fc", 1)]["weight"].shape[0]) if layers else None,
        proj_out_dim=int(fc[("fc", layers)]["weight"].shape[0]) if layers else 2048,
        proj_layers=layers,
        pred_hidden_dim=pred_hidden,
    )
    return out, architecture


def _from_suncet(path: Path, raw: dict[str, Any]) -> PretrainedWeights:
    encoder, architecture = suncet_to_encoder_state(raw["encoder"], f"released PAWS checkpoint '{path}'")
    with torch.device("meta"):
        expected = architecture.build().state_dict()
    # Old BatchNorm layers had no batch counter; it only matters for momentum=None, which nothing here uses.
    filled = [k for k in expected if k.endswith("num_batches_tracked") and k not in encoder]
    for key in filled:
        encoder[key] = torch.zeros((), dtype=torch.long)
    check_state(expected, encoder, f"released PAWS checkpoint '{path}' (keys renamed to the toolkit's)")
    meta = {key: raw[key] for key in ("epoch", "unlabel_prob", "world_size", "lr") if key in raw}
    meta["filled_batch_counters"] = len(filled)
    return PretrainedWeights(path, "suncet", None, architecture, encoder, {}, meta)


def resolve_settings(
    weights: PretrainedWeights,
    recipe: str | None,
    overrides: Sequence[str],
    *,
    environ: Mapping[str, str] | None = None,
    new_run: bool = False,
) -> tuple[Settings, list[str]]:
    """Settings for using ``weights``: checkpoint's settings < recipe < environment < key=value overrides.

    The architecture (``model.backbone``/``proj_*``/``pred_hidden_dim``) is the checkpoint's: a recipe's
    differing values are replaced (and reported in the returned notes); an override that contradicts it is an
    error. A released suncet checkpoint carries no settings, so the data must be given by a recipe or
    ``data.*`` overrides. ``new_run=True`` drops the pretraining run's ``run.name``, ``run.max_steps`` and
    ``run.time_budget_s`` (they describe that run, not the new one).
    """
    given_data = any(o.split("=", 1)[0].strip().startswith("data.") for o in overrides)
    if weights.settings is None and recipe is None and not given_data:
        raise ConfigError(
            f"'{weights.path}' is a released PAWS checkpoint and carries no settings: give the dataset and "
            "evaluation settings with --recipe NAME|PATH or data.* overrides (e.g. data.dataset=array "
            "data.path=DIR data.split=FILE); the model architecture "
            f"({weights.architecture.backbone}) is read from the weights"
        )
    tree = upgrade_saved_tree(weights.settings) if weights.settings is not None else {}
    if new_run:
        for key in ("name", "max_steps", "time_budget_s"):
            tree.get("run", {}).pop(key, None)
    if recipe is not None:
        tree = merge_trees(tree, load_recipe_tree(recipe))
    arch = weights.architecture.model_settings()
    model_tree = dict(tree.get("model", {}))
    notes = [
        f"model.{k}: the recipe says {model_tree[k]!r}, the checkpoint has {v!r}; using the checkpoint's"
        for k, v in arch.items()
        if k in model_tree and model_tree[k] != v
    ]
    tree["model"] = {**model_tree, **arch}
    settings = load_settings(None, overrides, environ=environ, base=tree)
    clash = [
        f"model.{k}={getattr(settings.model, k)!r} (checkpoint: {v!r})"
        for k, v in arch.items()
        if getattr(settings.model, k) != v
    ]
    if clash:
        raise ConfigError(
            f"the architecture is fixed by the checkpoint '{weights.path}': {', '.join(clash)}; drop these overrides"
        )
    return settings, notes
