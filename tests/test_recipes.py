"""The paper's recipes: every one validates, and its key numbers are the spec's (sections 6 and 8, paper Tables 1,
2 and 4); `paws recipes ls` shows their global numbers; runs warn when the process count differs from the recipe's.

The expected values below are typed from PAWS-SPEC.md (not read from the recipes), so a wrong number in a
recipe fails here. Sizes in recipes are per process; the table states GLOBAL values, as the paper does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config import ConfigError, load_settings, recipe_names
from paws_cli.config.loader import RECIPES_DIR
from paws_cli.reproduce.recipe_table import global_support, listed_recipes, load_for_listing, recipe_row
from paws_cli.train.banner import world_size_warning

# name: (world size, global batch, global support (classes, images, views), (start lr, lr, final lr), epochs,
#        warm-up epochs, me-max, backbone, labelled split)
IMAGENET = {"tau": 0.1, "T": 0.25, "smoothing": 0.1}
EXPECTED = {
    # spec 6: 64 V100, 64 x 64 = 4096, 15 x 7 per GPU with unique classes = 960 x 7; 0.3 -> 6.4 -> 0.064, 10 ep.
    "r50_1pct": (64, 4096, (960, 7, 1), (0.3, 6.4, 0.064), 100, 10, True, "resnet50", "official:1%"),
    "r50_10pct": (64, 4096, (960, 7, 1), (0.3, 6.4, 0.064), 100, 10, True, "resnet50", "official:10%"),
    # paper Table 2: the same set-up with the SimCLR-wide backbones
    "r50x2_1pct": (64, 4096, (960, 7, 1), (0.3, 6.4, 0.064), 100, 10, True, "resnet50x2", "official:1%"),
    "r50x2_10pct": (64, 4096, (960, 7, 1), (0.3, 6.4, 0.064), 100, 10, True, "resnet50x2", "official:10%"),
    "r50x4_1pct": (64, 4096, (960, 7, 1), (0.3, 6.4, 0.064), 100, 10, True, "resnet50x4", "official:1%"),
    "r50x4_10pct": (64, 4096, (960, 7, 1), (0.3, 6.4, 0.064), 100, 10, True, "resnet50x4", "official:10%"),
    # paper Table 4 / spec 6: 8 V100, batch 256, support 560 x 3, 0.3 -> 1.2 (final 1.2/100), me-max off
    "r50_10pct_8gpu": (8, 256, (560, 3, 1), (0.3, 1.2, 0.012), 100, 10, False, "resnet50", "official:10%"),
    # spec 6: 1 GPU, batch 256, 10 x 64 x 2 views = 1280 supports, 0.8 -> 3.2 -> 0.032, 600 epochs
    "wrn28x2_cifar10_4000": (
        1,
        256,
        (10, 64, 2),
        (0.8, 3.2, 0.032),
        600,
        10,
        True,
        "wrn28_2",
        "official:cifar10-4000-152",
    ),
}
PAPER_RECIPES = sorted(EXPECTED)


def _load(name: str) -> object:
    return load_settings(name, ["data.path=/data/placeholder"], environ={})


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_recipe_numbers_are_the_spec_s(name: str) -> None:
    world, batch, support, lrs, epochs, warmup, me_max, backbone, split = EXPECTED[name]
    s = _load(name)
    assert s.world_size == world
    assert s.optim.batch_size * s.world_size == batch
    assert global_support(s) == support
    assert (s.optim.start_lr, s.optim.lr, s.optim.final_lr) == pytest.approx(lrs)
    assert (s.optim.epochs, s.optim.warmup_epochs) == (epochs, warmup)
    assert s.optim.optimizer == "lars" and s.optim.weight_decay == pytest.approx(1e-6)
    assert s.optim.momentum == pytest.approx(0.9) and s.optim.trust_coefficient == pytest.approx(0.001)
    assert (s.paws.tau, s.paws.sharpen_T, s.paws.label_smoothing) == pytest.approx(
        (IMAGENET["tau"], IMAGENET["T"], IMAGENET["smoothing"])
    )
    assert s.paws.me_max is me_max
    assert s.model.backbone == backbone
    assert s.data.split == split
    assert s.run.precision == "fp16"  # spec 6: mixed precision, the loss in fp32


@pytest.mark.parametrize("name", [n for n in PAPER_RECIPES if n.startswith("r50")])
def test_imagenet_recipes_views_heads_and_finetuning(name: str) -> None:
    s = _load(name)
    a = s.augment
    # spec 3: 2 x 224 px (scale 0.14-1) + 6 x 96 px (0.05-0.14), jitter s = 1, grayscale 0.2, blur 0.5, V = 1
    assert (a.large_size, a.large_scale, a.num_small, a.small_size, a.small_scale) == (
        224,
        (0.14, 1.0),
        6,
        96,
        (0.05, 0.14),
    )
    assert (a.jitter_strength, a.jitter_p, a.grayscale_p, a.blur_p, a.support_views) == (
        1.0,
        0.8,
        0.2,
        0.5,
        1,
    )
    # spec 4: projection hidden = the backbone's width (null), D = 2048, prediction head D/4
    assert (s.model.proj_hidden_dim, s.model.proj_out_dim, s.model.proj_layers, s.model.pred_hidden_dim) == (
        None,
        2048,
        3,
        512,
    )
    assert s.data.dataset == "imagefolder" and s.data.format == "ffcv"
    # spec 7: SimCLRv2 fine-tuning, global batch 1024, selected on val.txt
    f = s.finetune
    assert f.batch_size * 64 == 1024 and f.epochs == 50 and f.lr == pytest.approx(0.02)
    assert (f.nesterov, f.momentum, f.weight_decay, f.keep_projection_layers) == (True, 0.9, 0.0, 1)
    assert f.val_split == "official:val"


def test_cifar_recipe_views_and_model() -> None:
    s = _load("wrn28x2_cifar10_4000")
    a = s.augment
    # spec 3: 32 px (0.75-1) + 6 x 18 px (0.3-0.75), s = 0.5, solarize/equalize 0.2, no grayscale, no blur
    assert (a.large_size, a.large_scale, a.num_small, a.small_size, a.small_scale) == (
        32,
        (0.75, 1.0),
        6,
        18,
        (0.3, 0.75),
    )
    assert (a.jitter_strength, a.solarize_p, a.equalize_p, a.grayscale_p, a.blur_p) == (
        0.5,
        0.2,
        0.2,
        0.0,
        0.0,
    )
    assert (s.model.proj_out_dim, s.model.pred_hidden_dim) == (
        128,
        None,
    )  # spec 4: D = 128, no prediction head
    assert (s.data.dataset, s.data.format) == ("cifar10", "memory")


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_recipe_files_state_world_size_description_and_provenance(name: str) -> None:
    raw = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    assert isinstance(raw["world_size"], int)  # stated in the file itself, not only inherited
    assert raw["description"].strip()
    provenance = raw["provenance"]
    assert isinstance(provenance, dict) and "published" in provenance
    assert all(isinstance(v, str) and ("spec" in v or "paper" in v) for v in provenance.values())


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("r50_1pct", "data.path=/path/to/train.beton"),
        ("r50x4_10pct", "data.path=/path/to/train.beton"),
        ("wrn28x2_cifar10_4000", "data.path=/path/to/cifar-10-batches-py"),
    ],
)
def test_an_unset_data_path_says_what_to_pass(name: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=r"needs data\.path") as info:
        load_settings(name, environ={})
    assert hint in str(info.value)
    with pytest.raises(ConfigError, match=r"data\.path=/path/to/imagenet/train"):
        load_settings("r50_1pct", ["data.format=folder"], environ={})


def test_every_recipe_validates_and_bases_are_not_listed() -> None:
    names = recipe_names()
    assert "_imagenet_base" in names and set(PAPER_RECIPES) <= set(names)
    assert "_imagenet_base" not in listed_recipes()
    for name in names:
        load_for_listing(name)


def test_recipe_rows_show_global_numbers() -> None:
    row = recipe_row("r50_10pct_8gpu")
    assert (row.model, row.labels, row.world_size, row.global_batch, row.global_support, row.schedule) == (
        "resnet50",
        "10%",
        8,
        256,
        "560 x 3",
        "100 epochs",
    )
    assert recipe_row("wrn28x2_cifar10_4000").global_support == "10 x 64 x 2 views"
    assert recipe_row("fmnist_demo").labels == "10 per class"


def test_a_schedule_in_steps_is_listed_in_steps() -> None:
    from paws_cli.reproduce.recipe_table import schedule_text

    steps = load_settings("fmnist_demo", ["optim.total_steps=2000", "optim.warmup_steps=100"], environ={})
    assert schedule_text(steps) == "2000 steps"
    assert schedule_text(load_settings("fmnist_60pc", [], environ={})).endswith(" epochs")


def test_recipes_ls_table() -> None:
    result = CliRunner().invoke(app, ["recipes", "ls"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.startswith("│")}
    assert "_imagenet_base" not in lines
    r50 = [cell.strip() for cell in lines["r50_1pct"].split("│")[1:-1]]
    assert r50[:7] == ["r50_1pct", "resnet50", "1%", "64", "4096", "960 x 7", "100 epochs"]
    shown = CliRunner().invoke(app, ["recipes", "show", "r50x2_1pct"])
    assert shown.exit_code == 0 and "backbone: resnet50x2" in shown.output


def test_world_size_warning_numbers() -> None:
    s = _load("r50_1pct")
    assert world_size_warning(s, 64) is None
    text = world_size_warning(s, 8)
    assert "global unlabelled batch is 512 (recipe: 4096)" in text
    assert "120 classes x 7 images (recipe: 960 x 7)" in text
    assert "0.3 -> 6.4 -> 0.064" in text
    assert "optim.batch_size=512 paws.classes_per_batch=120 world_size=8" in text
    assert "cannot be kept exactly" in world_size_warning(s, 7)  # 4096 / 7 is not an integer
    # shared classes (CIFAR): the processes split each class's images, so images per class scale instead
    cifar = world_size_warning(_load("wrn28x2_cifar10_4000"), 2)
    assert "10 classes x 128 images (recipe: 10 x 64)" in cifar
    assert "optim.batch_size=128 paws.images_per_class=32 world_size=2" in cifar


@pytest.mark.slow
def test_a_run_prints_globals_and_warns_about_the_world_size(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    args = ["pretrain", "--recipe", "fmnist_demo", *tiny_overrides, "world_size=4", "run.max_steps=1"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "global unlabelled batch: 16 (16 per process)" in out
    assert "global support: 4 classes x 2 images x 1 view(s) = 8 per step" in out
    assert "lr: 0.1 -> 1.0 over 0.5 warm-up epochs, cosine to 0.01" in out
    assert "steps: 16 per epoch x 2.0 epochs = 32" in out
    assert (
        "recipe was written for world_size=4" in out and "global unlabelled batch is 16 (recipe: 64)" in out
    )
