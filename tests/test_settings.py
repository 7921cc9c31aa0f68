"""Settings resolution: precedence, recipes, unknown keys with suggestions, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from paws_cli.config import ConfigError, load_settings, recipe_names, setting_paths, settings_to_yaml


def test_precedence_overrides_beat_environment_beat_recipe_beat_defaults() -> None:
    defaults = load_settings(environ={})
    assert defaults.optim.lr == 6.4  # the paper's ImageNet value is the default
    recipe = load_settings("fmnist_demo", environ={})
    assert recipe.optim.lr == 1.0
    env = {"PAWS_OPTIM__LR": "0.5", "PAWS_RUN__SEED": "7"}
    from_env = load_settings("fmnist_demo", environ=env)
    assert (from_env.optim.lr, from_env.run.seed) == (0.5, 7)
    both = load_settings("fmnist_demo", ["optim.lr=0.25"], environ=env)
    assert (both.optim.lr, both.run.seed) == (0.25, 7)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("optim.lrr=1", "unknown setting 'optim.lrr'.*Did you mean 'optim.lr'"),
        ("optm.lr=1", "unknown setting 'optm.lr'.*'optim.lr'"),
        ("lr=1", "unknown setting 'lr'.*'optim.lr'"),
        ("support.imgs_per_class=3", "paws.images_per_class"),
        (
            "optim.lr=-1",
            r"optim\.lr: Input should be greater than 0 \(got -1\) \[from override 'optim.lr=-1'\]",
        ),
        ("paws.sharpen_T=0", "paws.sharpen_T: Input should be greater than 0"),
        ("optim.lr=fast", "optim.lr: Input should be a valid number"),
        ("augment.large_scale=[0.9,0.2]", "augment.large_scale must satisfy"),
        ("optim", "is not key=value"),
    ],
)
def test_override_errors_name_key_value_and_source(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings("fmnist_demo", [override], environ={})


def test_unknown_environment_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"PAWS_OPTIM__LRR.*'optim.lr'"):
        load_settings(environ={"PAWS_OPTIM__LRR": "1"})


def test_recipe_typos_at_any_depth(tmp_path: Path) -> None:
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim:\n  lr: 1.0\n  warmpu_epochs: 2\n")
    with pytest.raises(
        ConfigError, match=r"unknown setting 'optim.warmpu_epochs' in recipe .*nested.yaml.*warmup_epochs"
    ):
        load_settings(str(nested), environ={})
    top = tmp_path / "top.yaml"
    top.write_text("optimm:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown settings section 'optimm'.*Did you mean section 'optim'"):
        load_settings(str(top), environ={})
    with pytest.raises(ConfigError, match=r"unknown recipe 'fmnist_dem'.*fmnist_demo"):
        load_settings("fmnist_dem", environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(str(tmp_path / "missing.yaml"), environ={})


def test_recipe_inheritance_and_resolved_yaml_round_trip(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("base: fmnist_demo\noptim:\n  lr: 0.3\n")
    settings = load_settings(str(child), environ={})
    assert (
        settings.optim.lr == 0.3
        and settings.model.backbone == load_settings("fmnist_demo", environ={}).model.backbone
    )
    resolved = tmp_path / "resolved_config.yaml"
    resolved.write_text(settings_to_yaml(settings, {"git_commit": "abc", "versions": {"torch": "x"}}))
    assert load_settings(str(resolved), environ={}) == settings


def test_every_field_is_documented_and_every_recipe_loads() -> None:
    undocumented = [k for k, info in setting_paths().items() if not info.description]
    assert undocumented == []
    assert "fmnist_demo" in recipe_names()
    from paws_cli.reproduce.recipe_table import load_for_listing

    for name in recipe_names():  # recipes for ImageNet/CIFAR-10 leave data.path to the user
        load_for_listing(name)


def test_label_percent_replaces_default_count_but_not_an_explicit_one() -> None:
    assert load_settings(overrides=["data.label_percent=10"], environ={}).data.labels_per_class is None
    with pytest.raises(ConfigError, match="only one of"):
        load_settings(overrides=["data.label_percent=10", "data.labels_per_class=5"], environ={})
