"""`paws export`: the backbone with timm key names, loaded strictly by ``timm.create_model(checkpoint_path=...)``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config import load_settings
from paws_cli.export import export_command, export_weights, timm_backbone_state
from paws_cli.methods.paws import PAWSModel
from paws_cli.models import create_encoder
from paws_cli.pretrained import PretrainedWeights, load_pretrained, suncet_to_encoder_state
from paws_cli.train.checkpoint_io import CheckpointError, save_checkpoint

QUIET = Console(quiet=True)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread (small inputs gain nothing from more; robust on a busy machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: PAWSEncoder head names -> the released checkpoints' names.
TO_SUNCET = {
    "projection.first.fc.": "fc.fc1.",
    "projection.first.bn.": "fc.bn1.",
    "projection.middle.0.fc.": "fc.fc2.",
    "projection.middle.0.bn.": "fc.bn2.",
    "projection.last.": "fc.fc3.",
    "prediction.bn_in.": "pred.bn1.",
    "prediction.fc1.": "pred.fc1.",
    "prediction.bn1.": "pred.bn2.",
    "prediction.fc2.": "pred.fc2.",
}


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm parameters/statistics and biases on top of the (seeded) random weights: every layer
    differs from every other, and the activations stay well scaled, so outputs are far from constant."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            elif tensor.ndim == 1:  # normalisation weights
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=gen))
    return module.eval()


@pytest.fixture(scope="module")
def rn50_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A toolkit checkpoint of a resnet50x1 encoder (random weights, RGB) and that encoder."""
    torch.manual_seed(0)
    encoder = _randomise(create_encoder("resnet50x1", 3, 256, 128, 2, None))
    settings = load_settings(
        "fmnist_demo",
        ["model.backbone=resnet50x1", "model.proj_hidden_dim=256", "model.proj_out_dim=128"],
        environ={},
    )
    payload = {
        "method": "paws",
        "settings": settings.model_dump(mode="json"),
        "model": PAWSModel(encoder).state_dict(),
    }
    path = save_checkpoint(tmp_path_factory.mktemp("rn50") / "checkpoint.pt", payload)
    return path, encoder


def test_safetensors_export_loads_strictly_in_timm(rn50_checkpoint, tmp_path: Path) -> None:
    path, encoder = rn50_checkpoint
    out = tmp_path / "backbone.safetensors"
    written = export_command(path, out, fmt="safetensors", with_projection=True, console=QUIET)
    assert written == [out, tmp_path / "backbone.projection.safetensors"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = encoder.backbone(x)
        for name in ("resnet50x1", "resnet50"):  # timm's own ResNet-50 has the same layout
            model = timm.create_model(name, pretrained=False, num_classes=0, checkpoint_path=str(out)).eval()
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    head = load_file(str(written[1]))
    assert set(head) == set(encoder.projection.first.state_dict())
    assert torch.equal(head["fc.weight"], encoder.projection.first.fc.weight)


def test_timm_format_carries_the_projection_beside_the_state_dict(rn50_checkpoint, tmp_path: Path) -> None:
    path, encoder = rn50_checkpoint
    out = tmp_path / "backbone.pth"
    export_weights(load_pretrained(path), out, fmt="timm", with_projection=True)
    model = timm.create_model("resnet50x1", num_classes=0, checkpoint_path=str(out)).eval()
    payload = torch.load(out, weights_only=True)
    assert payload["arch"] == "resnet50x1" and payload["in_chans"] == 3
    first = torch.nn.Sequential(torch.nn.Linear(2048, 256), torch.nn.BatchNorm1d(256), torch.nn.ReLU())
    first.load_state_dict(
        {k.replace("fc.", "0.").replace("bn.", "1."): v for k, v in payload["projection"].items()}
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(first.eval()(model(x)), encoder.projection.first(encoder.backbone(x)))


def test_wide_models_keys_match_timm(tmp_path: Path) -> None:
    """resnet50x2/x4 from the released layout: every key and shape fits the registered timm model (meta device)."""
    for width, name in ((2, "resnet50x2"), (4, "resnet50x4")):
        with torch.device("meta"):
            encoder = create_encoder(name, 3, None, 2048, 3, 512)
        released = {}
        for key, value in encoder.state_dict().items():
            if key.startswith("backbone."):
                released[f"module.{key[9:]}"] = value
            else:
                prefix = next(p for p in TO_SUNCET if key.startswith(p))
                released[f"module.{TO_SUNCET[prefix]}{key[len(prefix) :]}"] = value
        state, arch = suncet_to_encoder_state(released, "released")
        assert arch.backbone == name and arch.proj_hidden_dim == 2048 * width
        weights = PretrainedWeights(tmp_path / "x.pth.tar", "suncet", None, arch, state)
        timm_name, backbone = timm_backbone_state(weights)  # raises on any key or shape difference
        with torch.device("meta"):
            reference = timm.create_model(timm_name, num_classes=0).state_dict()
        assert {k: tuple(v.shape) for k, v in backbone.items()} == {
            k: tuple(v.shape) for k, v in reference.items()
        }
        assert backbone["conv1.weight"].shape == (64 * width, 3, 7, 7)  # the widened stem


def test_export_errors(rn50_checkpoint, tmp_path: Path) -> None:
    path, _ = rn50_checkpoint
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        export_command(path, tmp_path / "b.pth", fmt="safetensors", with_projection=False, console=QUIET)
    with pytest.raises(ValueError, match=r"must not end in \.safetensors"):
        export_command(path, tmp_path / "b.safetensors", fmt="timm", with_projection=False, console=QUIET)
    with pytest.raises(ValueError, match="--format must be one of"):
        export_command(path, tmp_path / "b.onnx", fmt="onnx", with_projection=False, console=QUIET)
    weights = load_pretrained(path)
    weights.encoder_state.pop("backbone.layer1.0.conv1.weight")
    with pytest.raises(CheckpointError, match=r"1 missing: layer1\.0\.conv1\.weight"):
        timm_backbone_state(weights)


def test_cli_export_of_a_small_backbone(tiny_overrides: list[str], tmp_path: Path) -> None:
    settings = load_settings("fmnist_demo", tiny_overrides, environ={})
    torch.manual_seed(0)
    encoder = _randomise(create_encoder("cnn_w16", 1, 64, 64, 2, None))
    payload = {
        "method": "paws",
        "settings": settings.model_dump(mode="json"),
        "model": PAWSModel(encoder).state_dict(),
    }
    path = save_checkpoint(tmp_path / "checkpoint.pt", payload)
    out = tmp_path / "cnn.safetensors"
    result = CliRunner().invoke(app, ["export", str(path), str(out)])
    assert result.exit_code == 0, result.output
    assert "in_chans=1" in result.output and "import paws_cli.models" in result.output
    model = timm.create_model("cnn_w16", num_classes=0, in_chans=1, checkpoint_path=str(out)).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), encoder.backbone(x))
    bad = CliRunner().invoke(app, ["export", str(path), str(tmp_path / "x.bin"), "--format", "safetensors"])
    assert bad.exit_code == 2 and "must end in .safetensors" in bad.output
