"""First contact without friction: `paws pretrain` without a recipe, `paws export` over an existing file, the
README's timm line run as written for every backbone the toolkit registers, and start lines that say what trains
(the supervised baseline: labelled images, its real step count) and what fine-tuning selected."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config import Settings, load_settings
from paws_cli.methods.paws import PAWSModel
from paws_cli.models import PAWS_BACKBONES, create_encoder
from paws_cli.reproduce.recipe_table import listed_recipes
from paws_cli.train.banner import describe_globals, images_per_step, start_line
from paws_cli.train.checkpoint_io import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


# ---------------------------------------------------------------------------------------- pretrain, no recipe


@pytest.mark.parametrize("overrides", [[], ["optim.lr=0.1", "data.labels_per_class=4"]])
def test_pretrain_without_a_recipe_asks_for_one(overrides: list[str], tmp_path: Path) -> None:
    code, out = _run("pretrain", *overrides, f"run.out_dir={tmp_path}")
    assert code == 2, out
    assert "--recipe NAME" in out and "paws recipes ls" in out and "--recipe fmnist_demo" in out
    assert all(name in out for name in listed_recipes())  # the names to copy, in the message itself
    assert "Traceback" not in out and "classes_per_batch" not in out  # not the old support-count failure
    assert not any(tmp_path.iterdir())  # nothing was started


def test_print_config_without_a_recipe_shows_the_defaults() -> None:
    code, out = _run("pretrain", "--print-config", "optim.lr=0.7")
    assert code == 0, out
    assert "lr: 0.7" in out and "method: paws" in out


# ------------------------------------------------------------------------------------------------------ export


def _checkpoint(directory: Path, backbone: str, in_chans: int, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A toolkit checkpoint of a PAWS encoder with random weights and random BatchNorm statistics."""
    settings = load_settings("fmnist_demo", [f"model.backbone={backbone}"], environ={})
    torch.manual_seed(seed)
    encoder = create_encoder(backbone, in_chans, 32, 32, 2, None)
    gen = torch.Generator().manual_seed(seed)
    with (
        torch.no_grad()
    ):  # BatchNorm statistics that differ from the initial ones: the export must carry them
        for name, tensor in encoder.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    payload = {
        "method": "paws",
        "settings": settings.model_dump(mode="json"),
        "model": PAWSModel(encoder).state_dict(),
    }
    return save_checkpoint(directory / f"{backbone}.pt", payload), encoder.eval()


def test_export_refuses_to_overwrite_without_the_flag(tmp_path: Path) -> None:
    first, _ = _checkpoint(tmp_path, "cnn_w16", 1, seed=0)
    second, _ = _checkpoint(tmp_path, "cnn_w16", 1, seed=1)
    out = tmp_path / "backbone.safetensors"
    code, output = _run("export", str(first), str(out))
    assert code == 0, output
    before = out.read_bytes()
    code, output = _run("export", str(second), str(out))
    assert code == 2, output
    assert str(out) in output and "--overwrite" in output and "already exists" in output
    assert out.read_bytes() == before  # untouched
    code, output = _run("export", str(second), str(out), "--overwrite")
    assert code == 0, output
    assert out.read_bytes() != before
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))  # atomic: no leftovers
    # the projection file beside a safetensors export counts too
    code, output = _run("export", str(second), str(tmp_path / "b.safetensors"), "--with-projection")
    assert code == 0, output
    (tmp_path / "b.safetensors").unlink()
    code, output = _run("export", str(second), str(tmp_path / "b.safetensors"), "--with-projection")
    assert code == 2 and "b.projection.safetensors" in output and "--overwrite" in output, output
    assert not (tmp_path / "b.safetensors").exists()
    # the printed lines are the README's: import paws_cli.models, then timm with the data's channels
    code, output = _run("export", str(second), str(out), "--overwrite")
    assert (
        "import paws_cli.models" in output
        and 'timm.create_model("cnn_w16", num_classes=0, in_chans=1' in output
    )


def readme_timm_snippet() -> str:
    """The README's ```python block that loads an export with timm, unindented."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.M | re.S)
    snippets = [body for _, body in blocks if "timm.create_model" in body]
    assert len(snippets) == 1, "the README's timm block was not found"
    indent = len(re.match(r" *", snippets[0])[0])
    return "\n".join(line[indent:] for line in snippets[0].splitlines()) + "\n"


#: (backbone, channels): each registered backbone small enough to build in a test; the wide ResNet-50s share
#: resnet50x1's code path (their keys are checked against timm in test_export.py) and take seconds each.
BACKBONES = [
    (
        "cnn_w16",
        1,
    ),  # a fresh interpreter imports torch and timm: seconds each, so the others run with -m slow
    pytest.param("cnn_w32", 3, marks=pytest.mark.slow),
    pytest.param("wrn28_2", 3, marks=pytest.mark.slow),
    pytest.param("resnet50x1", 3, marks=pytest.mark.slow),
]


def test_every_registered_backbone_is_covered() -> None:
    covered = {b.values[0] if hasattr(b, "values") else b[0] for b in BACKBONES}  # pytest.param too
    assert covered | {"resnet50x2", "resnet50x4"} == set(PAWS_BACKBONES)


@pytest.mark.parametrize(("backbone", "in_chans"), BACKBONES)
def test_readme_timm_line_loads_each_backbone_in_a_fresh_interpreter(
    backbone: str, in_chans: int, tmp_path: Path
) -> None:
    checkpoint, encoder = _checkpoint(tmp_path, backbone, in_chans)
    work = tmp_path / "work"
    work.mkdir()
    code, output = _run("export", str(checkpoint), str(work / "backbone.safetensors"))
    assert code == 0, output
    snippet = readme_timm_snippet()
    assert '"cnn_w16"' in snippet and "in_chans=1" in snippet and "import paws_cli.models" in snippet
    # As written for the demo's cnn_w16; another backbone changes only the name and the channel count.
    snippet = snippet.replace('"cnn_w16"', f'"{backbone}"').replace("in_chans=1", f"in_chans={in_chans}")
    x = torch.randn(2, in_chans, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.save(x, work / "x.pt")
    script = snippet + "import torch\ntorch.save(model.eval()(torch.load('x.pt')), 'y.pt')\n"
    # A fresh interpreter: nothing registered timm's names but the snippet's own import.
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(work / "y.pt"), encoder.backbone(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- start lines and the supervised baseline


def _settings(*overrides: str) -> Settings:
    return load_settings("fmnist_demo", list(overrides), environ={})


def test_start_lines_name_the_method_once() -> None:
    run_dir = Path("runs/x")
    assert _plain(start_line(_settings(), run_dir)) == "PAWS pretraining -> runs/x"
    assert _plain(start_line(load_settings("semppl_fmnist_demo", [], environ={}), run_dir)) == (
        "SemPPL pretraining -> runs/x"
    )
    assert _plain(start_line(_settings("method=supervised"), run_dir)) == (
        "supervised-only baseline: training on the labelled images only -> runs/x"
    )
    assert _plain(start_line(_settings(), Path("runs/[a]"))) == "PAWS pretraining -> runs/[a]"  # not markup


def _plain(markup: str) -> str:
    from rich.text import Text

    return Text.from_markup(markup).plain


def test_supervised_banner_speaks_of_labelled_images_and_its_real_steps() -> None:
    settings = _settings(
        "method=supervised", "supervised.classes_per_batch=10", "supervised.images_per_class=8"
    )
    lines = describe_globals(settings, 1, steps_per_epoch=937, total_steps=2342)
    text = "\n".join(lines)
    assert "unlabelled batch" not in text and "global support" not in text
    assert "global labelled batch: 10 classes x 8 images = 80 labelled images per step" in lines
    assert lines[-1].startswith("steps: 937 per epoch x 2.5 epochs = 2342 (epochs as PAWS counts them")
    assert images_per_step(settings, 1) == (80, "labelled")
    assert images_per_step(settings, 4) == (320, "labelled")
    assert images_per_step(_settings(), 2) == (128, "unlabelled")  # PAWS: the unlabelled batch, all processes


def test_time_budgeted_and_capped_runs_say_how_long_they_train() -> None:
    lines = describe_globals(_settings("run.time_budget_s=120"), 1, steps_per_epoch=937, total_steps=2342)
    assert lines[-2].startswith("lr: 0.1 -> 1.0 over the first 8% of the time budget, cosine to 0.01")
    assert lines[-1] == (
        "steps: as many as the time budget of 120 s allows (run.time_budget_s; the learning rate follows the share "
        "of the budget spent)"
    )
    assert "2342" not in lines[-1] and "epoch" not in lines[-1]
    capped = describe_globals(_settings("run.max_steps=50"), 1, steps_per_epoch=937, total_steps=2342)
    assert capped[-1] == (
        "steps: 937 per epoch x 2.5 epochs = 2342; this run stops after run.max_steps=50 steps at most"
    )


@pytest.mark.slow
def test_supervised_run_prints_labelled_images_and_no_method_name_twice(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    code, out = _run(
        "pretrain", "--recipe", "fmnist_demo", *tiny_overrides, "method=supervised", "run.time_budget_s=3"
    )
    assert code == 0, out
    assert "supervised-only baseline: training on the labelled images only ->" in out
    assert "global labelled batch: 4 classes x 2 images = 8 labelled images per step" in out
    assert "as many as the time budget of 3 s allows" in out
    assert "unlabelled" not in out and "paws paws" not in out.lower() and "support:" not in out
    done = re.search(r"done: (\d+) steps in ([\d.]+) s \((\d+) labelled img/s", out)
    assert done, out
    steps, seconds, speed = int(done[1]), float(done[2]), int(done[3])
    # images/s counts the 8 labelled images of each step (the PAWS batch size, 16, would double it)
    assert speed == pytest.approx(8 * steps / seconds, rel=0.1, abs=2)


# ----------------------------------------------------------------------------------------- fine-tuning's lines


def test_finetune_start_line_says_what_the_checkpoint_holds(tmp_path: Path) -> None:
    from paws_cli.finetune.progress import pretrained_text
    from paws_cli.pretrained import load_pretrained

    path, _ = _checkpoint(tmp_path, "cnn_w16", 1)
    weights = load_pretrained(path)
    assert pretrained_text(weights) == "PAWS pretraining"
    weights.settings = {**(weights.settings or {}), "method": "semppl"}
    assert pretrained_text(weights) == "SemPPL pretraining"
    weights.settings["method"] = "supervised"
    assert pretrained_text(weights) == "supervised-only baseline"
    weights.kind = "suncet"
    assert pretrained_text(weights) == "the authors' released PAWS weights"


def test_selection_line_names_the_selected_epoch() -> None:
    from paws_cli.finetune.progress import selection_text
    from paws_cli.finetune.results import FinetuneResult

    result = FinetuneResult(
        pretrained="a.pt", pretrained_kind="paws", mode="full", dataset="d", run_dir="r", checkpoint="c",
        best_checkpoint="b", train_images=80, heldout_images=20, heldout_source="s", test_images=100, epochs=50,
        steps=250, complete=True, train_seconds=1.0, selected_epoch=37, heldout_top1=85.0, test_top1=81.125,
    )  # fmt: skip
    assert selection_text(result) == (
        "selected epoch 37 of 50 by held-out top-1 (85.00% on 20 images); test top-1 81.12%"
    )
    result.selected_epoch = None
    assert selection_text(result) == ""
