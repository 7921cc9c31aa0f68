"""Resolve settings from layers: defaults < recipe (YAML) < environment (PAWS_SECTION__KEY) < key=value overrides.

Unknown keys at any depth are errors with a "did you mean"; validation errors name the key, the bad value and the
layer it came from. Pydantic validates; this module only merges and explains.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from paws_cli.config.alternatives import resolve_alternatives
from paws_cli.config.data_kind import apply_detected_kind
from paws_cli.config.errors import ConfigError
from paws_cli.config.schema import Settings
from paws_cli.config.trees import flatten_keys, merge_trees
from paws_cli.method_registry import method_sections

#: The named recipes: YAML files shipped as package data in paws_cli/recipes/ (a folder on disk for any install
#: from a wheel or a checkout, so it is handled as a Path).
RECIPES_DIR = Path(str(resources.files("paws_cli").joinpath("recipes")))
ENV_PREFIX = "PAWS_"
#: Top-level keys a recipe may hold besides settings: `base` (inherit another recipe), `provenance` (written into
#: resolved_config.yaml: versions and git commit; ignored when re-run) and `description` (shown by `recipes ls`).
RESERVED_KEYS = ("base", "provenance", "description")


#: Keys of earlier versions that moved into a method's own section: an error names the new key.
MOVED_KEYS = {
    "loss.tau": "paws.tau",
    "loss.sharpen_T": "paws.sharpen_T",
    "loss.me_max": "paws.me_max",
    "loss.label_smoothing": "paws.label_smoothing",
    "support.classes_per_batch": "paws.classes_per_batch",
    "support.images_per_class": "paws.images_per_class",
    "support.unique_classes_per_rank": "paws.unique_classes_per_rank",
}


def setting_paths(model: type[BaseModel] = Settings, prefix: str = "") -> dict[str, Any]:
    """Every dotted settings key mapped to its pydantic FieldInfo (leaves only); for ``Settings`` this includes
    the section of every registered method."""
    paths: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.update(setting_paths(annotation, f"{prefix}{name}."))
        else:
            paths[f"{prefix}{name}"] = field
    if model is Settings:
        for name, section in method_sections().items():
            paths.update(setting_paths(section, f"{prefix}{name}."))
    return paths


def _moved(key: str, source: str) -> ConfigError | None:
    """The error for a key of an earlier version, naming its new place; None for other keys."""
    section = key.split(".", 1)[0]
    new = MOVED_KEYS.get(key)
    if new is None and section not in ("loss", "support"):
        return None
    if new is None:
        leaf = key.split(".", 1)[1] if "." in key else ""
        close = difflib.get_close_matches(f"paws.{leaf}", list(setting_paths()), n=2, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return ConfigError(
            f"'{key}' in {source}: the '{section}:' section is gone; method settings now live in the method's "
            f"own section (paws.tau, paws.classes_per_batch, supervised.classes_per_batch, ...).{hint}"
        )
    also = f" (for method=supervised: 'supervised.{new.split('.', 1)[1]}')" if section == "support" else ""
    return ConfigError(
        f"'{key}' in {source} is now '{new}'{also}: method settings live in the method's own section. "
        "Rename the key."
    )


def _did_you_mean(key: str) -> str:
    keys = list(setting_paths())
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    if not close:  # also try the last component alone, e.g. 'lr' -> 'optim.lr'
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:3]
    return (
        f" Did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else " Run `paws settings` to list keys."
    )


def _check_known(tree: Mapping[str, Any], source: str, prefix: str = "") -> None:
    known = setting_paths()
    # every dotted prefix of a key is a section (method sections may nest one, e.g. semppl.labelled_batch)
    sections = {k.rsplit(".", n)[0] for k in known for n in range(1, k.count(".") + 1)}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in RESERVED_KEYS:
            continue
        if not prefix and key in ("loss", "support") and isinstance(value, Mapping):
            for leaf in value:
                raise _moved(f"{key}.{leaf}", source) or ConfigError(
                    f"unknown setting '{key}.{leaf}' in {source}"
                )
        if isinstance(value, Mapping) and dotted in sections:
            _check_known(value, source, f"{dotted}.")
        elif isinstance(value, Mapping) and not prefix:  # a whole section under a mistyped name
            close = difflib.get_close_matches(key, sorted(sections), n=2, cutoff=0.5)
            hint = f" Did you mean section {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown settings section '{dotted}' in {source}.{hint} Sections: {', '.join(sorted(sections))}."
            )
        elif dotted not in known:
            raise ConfigError(f"unknown setting '{dotted}' in {source}.{_did_you_mean(dotted)}")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{dotted}': '{part}' is a value, not a section")
    node[parts[-1]] = value


def _parse_value(text: str) -> Any:
    """'0.3' -> 0.3, 'true' -> True, 'null' -> None, '[0.1, 1]' -> list; anything else stays a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def find_recipe(name_or_path: str) -> Path:
    """A recipe file path from a name in paws_cli/recipes/ or a path; an error lists the known names."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file '{path}' does not exist")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = recipe_names()
    close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.4)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"unknown recipe '{name_or_path}'.{hint} Known recipes: {', '.join(names)}")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe_tree(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe's settings tree with its `base:` chain merged in (checked for unknown keys)."""
    path = find_recipe(name_or_path)
    if str(path) in _seen:
        raise ConfigError(f"recipe '{path}' inherits from itself through 'base:'")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of sections, got {type(tree).__name__}")
    _check_known(tree, f"recipe '{path}'")
    base = tree.pop("base", None)
    tree.pop("provenance", None)
    tree.pop("description", None)
    if base is not None:
        tree = merge_trees(load_recipe_tree(str(base), (*_seen, str(path))), tree)
    return tree


def recipe_description(name_or_path: str) -> str:
    data = yaml.safe_load(find_recipe(name_or_path).read_text()) or {}
    return str(data.get("description", ""))


def env_tree(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings from PAWS_SECTION__KEY variables (double underscore between levels)."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    known = setting_paths()
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        # Variable names are upper case: match keys case-insensitively (paws.sharpen_T from PAWS_PAWS__SHARPEN_T).
        dotted = {k.lower(): k for k in [*known, *MOVED_KEYS]}.get(dotted, dotted)
        if dotted not in known:
            moved = _moved(dotted, f"environment variable {name}")
            if moved:
                raise moved
            raise ConfigError(
                f"environment variable {name} is not a setting ('{dotted}').{_did_you_mean(dotted)} "
                f"Settings are PAWS_SECTION__KEY, e.g. PAWS_OPTIM__LR=0.3; unset {name} otherwise."
            )
        _set_dotted(tree, dotted, _parse_value(text))
        sources[dotted] = f"environment variable {name}"
    return tree, sources


def overrides_tree(overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    known = setting_paths()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. optim.lr=0.3)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in known:
            moved = _moved(key, f"override '{item}'")
            if moved:
                raise moved
            raise ConfigError(f"unknown setting '{key}' in override '{item}'.{_did_you_mean(key)}")
        _set_dotted(tree, key, _parse_value(text))
        sources[key] = f"override '{item}'"
    return tree, sources


def _explain(exc: ValidationError, sources: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or True)
        # model-level validators report the section only; their message names the keys.
        message = err["msg"].removeprefix("Value error, ")
        source = sources.get(loc)
        if source is None:
            # model-level validators name their keys in the message: the sources of those keys, highest first
            named = [s for k, s in sources.items() if f"{k}=" in message or k in message.split()]
            named.sort(key=lambda s: (not s.startswith("override"), not s.startswith("environment")))
            matches = [s for k, s in sources.items() if k.startswith(f"{loc}.")] if loc else []
            # model-level validators (method sections, the method name) name the key in their message
            matches += [s for k, s in sources.items() if not loc and k in message]
            matches = list(dict.fromkeys([*named, *matches]))
            source = "; ".join(matches[:2]) if named else matches[0] if matches else "recipe or defaults"
        value = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"  {loc or 'settings'}: {message}{value} [from {source}]")
    return "invalid settings:\n" + "\n".join(lines)


def load_settings(
    recipe: str | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve the settings: defaults < recipe (or `base`, e.g. a checkpoint's settings) < environment < overrides."""
    environ = os.environ if environ is None else environ
    sources: dict[str, str] = {}
    tree: dict[str, Any] = dict(base or {})
    if base is not None:
        sources.update({k: "the checkpoint's settings" for k in flatten_keys(tree)})
    if recipe is not None:
        tree = load_recipe_tree(recipe)
        sources.update({k: f"recipe '{recipe}'" for k in flatten_keys(tree)})
    env, env_sources = env_tree(environ)
    cli, cli_sources = overrides_tree(overrides)
    sources.update(env_sources)
    sources.update(cli_sources)
    # epochs or steps, and view sizes given or read from the data: the higher layer decides (config.alternatives)
    base_name = f"recipe '{recipe}'" if recipe is not None else "the checkpoint's settings"
    tree, env, cli = resolve_alternatives(
        [tree, env, cli], [base_name, "the PAWS_* environment variables", "the key=value overrides"]
    )
    tree = merge_trees(merge_trees(tree, env), cli)
    tree = apply_detected_kind(tree, {**env_sources, **cli_sources})  # data.path says what the data is
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, sources)) from None


def settings_to_yaml(settings: Settings, provenance: Mapping[str, Any] | None = None) -> str:
    """The resolved settings as a re-runnable recipe (`--recipe runs/X/resolved_config.yaml`)."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    if provenance:
        data = {"provenance": dict(provenance), **data}
    return yaml.safe_dump(data, sort_keys=False)
