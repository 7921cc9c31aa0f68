"""Methods are plug-ins: a toy method registered from this test file (not the package) trains through the CLI,
with its own settings section, labels inside the batch, an after-step hook and state that checkpoints carry;
methods of installed packages register through the `paws_cli.methods` entry-point group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config import ConfigError, Settings, load_settings
from paws_cli.config.schema import Section
from paws_cli.data.needs import DataNeeds
from paws_cli.data.sampling.batch import Batch
from paws_cli.method_registry import method_names, unregister_method
from paws_cli.methods import Method, register_method
from paws_cli.train.checkpoint_io import load_checkpoint

runner = CliRunner()
SEEN: dict[str, list[Tensor]] = {"labels": [], "ids": []}


class ToySettings(Section):
    temperature: float = Field(0.5, gt=0, description="Softmax temperature of the toy loss.")


class ToyModel(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.encoder(views)


class ToyMethod(Method):
    """Two large views of each image should match each other (an InfoNCE toy); it counts its steps."""

    settings_class = ToySettings

    def __init__(self, settings: Settings, *, in_chans: int, num_classes: int) -> None:
        super().__init__(settings, in_chans=in_chans, num_classes=num_classes)
        self.hook_calls = torch.zeros((), dtype=torch.long)

    @classmethod
    def data_needs(cls, settings: Settings) -> DataNeeds:
        return DataNeeds(unlabelled_views=True, support=None, labels_in_batch=True)

    def build_model(self) -> nn.Module:
        return ToyModel(self.build_encoder(prediction=False))

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        assert batch.labels is not None and batch.ids is not None and not batch.supports
        SEEN["labels"].append(batch.labels.clone())
        SEEN["ids"].append(batch.ids.clone())
        _, z = model(batch.views[:2])
        a, b = F.normalize(z.float(), dim=1).chunk(2)
        logits = a @ b.T / self.cfg.temperature
        loss = F.cross_entropy(logits, torch.arange(len(a)))
        return loss, {"loss": loss.detach()}

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        assert step == int(self.hook_calls) + 1 and total_steps >= step
        self.hook_calls += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"hook_calls": self.hook_calls.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.hook_calls = state["hook_calls"].clone()


@pytest.fixture()
def toy_method() -> Iterator[str]:
    register_method("toy_infonce")(ToyMethod)
    SEEN["labels"].clear()
    SEEN["ids"].clear()
    yield "toy_infonce"
    unregister_method("toy_infonce")


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.mark.slow
def test_toy_method_trains_through_the_cli(
    toy_method: str, tiny_overrides: list[str], tmp_path: Path
) -> None:
    overrides = [*tiny_overrides, f"method={toy_method}", f"{toy_method}.temperature=0.2", "run.name=toy"]
    _cli("pretrain", "--recipe", "fmnist_demo", *overrides, "run.max_steps=5")
    run_dir = tmp_path / "runs" / "toy"
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["method"] == toy_method and int(state["method_state"]["hook_calls"]) == 5
    assert state["settings"][toy_method] == {"temperature": 0.2}
    assert set(state["data"]) == {"unlabelled"}  # no support sampler was built
    output = _cli("pretrain", "--recipe", "fmnist_demo", *overrides, "--resume")
    assert "resuming" in output and "step 5 of 32" in output
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["step"] == 32 and int(state["method_state"]["hook_calls"]) == 32  # restored, then continued
    # Labels inside the batch: the true label for images of the labelled subset, -1 for all others.
    labelled = set(state["labelled"].tolist())
    dataset_labels = torch.as_tensor(np.load(Path(state["settings"]["data"]["path"]) / "train_labels.npy"))
    labels, ids = torch.cat(SEEN["labels"]), torch.cat(SEEN["ids"])
    inside = torch.tensor([int(i) in labelled for i in ids])
    assert inside.any() and (~inside).any()
    assert torch.equal(labels[inside], dataset_labels[ids[inside]]) and bool((labels[~inside] == -1).all())
    # Evaluation reads the toy checkpoint like any other.
    _cli("knn-eval", str(run_dir / "checkpoint.pt"))
    result = json.loads((run_dir / "knn_eval.json").read_text())
    assert result["method"] == toy_method and result["embedding"] == "projection"


def test_registry_names_and_errors(toy_method: str) -> None:
    assert {"paws", "supervised", toy_method} <= set(method_names())
    with pytest.raises(ValueError, match="already registered"):
        register_method("paws")(ToyMethod)
    with pytest.raises(ConfigError, match=r"method='toy_infonc' is not a registered method.*'toy_infonce'"):
        load_settings("fmnist_demo", ["method=toy_infonc"], environ={})
    with pytest.raises(ConfigError, match=r"toy_infonce.temperature: Input should be greater than 0"):
        load_settings("fmnist_demo", [f"method={toy_method}", "toy_infonce.temperature=0"], environ={})
    settings = load_settings("fmnist_demo", [f"method={toy_method}"], environ={})
    assert settings.method_settings == ToySettings()  # the selected method's section, defaults filled in


def test_old_keys_name_their_new_place() -> None:
    for key, new in (
        ("loss.tau=0.2", "'paws.tau'"),
        ("support.images_per_class=3", "'paws.images_per_class'"),
    ):
        with pytest.raises(ConfigError, match=new):
            load_settings("fmnist_demo", [key], environ={})
    with pytest.raises(ConfigError, match=r"is now 'paws\.sharpen_T'"):
        load_settings(None, [], environ={"PAWS_LOSS__SHARPEN_T": "0.3"})


def test_entry_point_plugin_registers(tmp_path: Path) -> None:
    """A package installed beside the toolkit adds a method through the entry-point group alone."""
    (tmp_path / "toy_plugin.py").write_text(
        "from paws_cli.config.schema import Section\n"
        "from paws_cli.methods import register_method\n"
        "from paws_cli.methods.paws import PAWSMethod\n\n"
        "class PluginSettings(Section):\n    scale: float = 1.0\n\n"
        "@register_method('plugin_paws')\nclass PluginPAWS(PAWSMethod):\n    settings_class = PluginSettings\n"
    )
    info = tmp_path / "toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[paws_cli.methods]\nplugin_paws = toy_plugin\n")
    code = (
        "from paws_cli.config import load_settings\n"
        "s = load_settings('fmnist_demo', ['method=plugin_paws', 'plugin_paws.scale=2'], environ={})\n"
        "print(s.method, s.method_settings.scale)"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["plugin_paws", "2.0"]
