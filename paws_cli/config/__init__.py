"""Settings: the schema (one pydantic tree) and its resolution from recipes, environment and overrides."""

from paws_cli.config.loader import (
    ConfigError,
    find_recipe,
    load_settings,
    recipe_description,
    recipe_names,
    setting_paths,
    settings_to_yaml,
)
from paws_cli.config.schema import Settings

__all__ = [
    "ConfigError",
    "Settings",
    "find_recipe",
    "load_settings",
    "recipe_description",
    "recipe_names",
    "setting_paths",
    "settings_to_yaml",
]
