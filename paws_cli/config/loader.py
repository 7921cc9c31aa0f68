"""Resolve settings from layers: defaults < recipe (YAML) < environment (PAWS_SECTION__KEY) < key=value overrides.

Unknown keys at any depth are errors with a "did you mean"; validation errors name the key, the bad value and the
layer it came from. Pydantic validates; this module only merges and explains.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from paws_cli.config.schema import Settings

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
ENV_PREFIX = "PAWS_"
#: Top-level keys a recipe may hold besides settings: `base` (inherit another recipe), `provenance` (written into
#: resolved_config.yaml: versions and git commit; ignored when re-run) and `description` (shown by `recipes ls`).
RESERVED_KEYS = ("base", "provenance", "description")


class ConfigError(ValueError):
    """A settings problem the user must fix; the message says which key, value and source."""


def setting_paths(model: type[BaseModel] = Settings, prefix: str = "") -> dict[str, Any]:
    """Every dotted settings key mapped to its pydantic FieldInfo (leaves only)."""
    paths: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.update(setting_paths(annotation, f"{prefix}{name}."))
        else:
            paths[f"{prefix}{name}"] = field
    return paths


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
    sections = {k.split(".", 1)[0] for k in known if "." in k}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in RESERVED_KEYS:
            continue
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


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_value(text: str) -> Any:
    """'0.3' -> 0.3, 'true' -> True, 'null' -> None, '[0.1, 1]' -> list; anything else stays a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def find_recipe(name_or_path: str) -> Path:
    """A recipe file path from a name in recipes/ or a path; an error lists the known names."""
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
        tree = _merge(load_recipe_tree(str(base), (*_seen, str(path))), tree)
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
        if dotted not in known:
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
            raise ConfigError(f"unknown setting '{key}' in override '{item}'.{_did_you_mean(key)}")
        _set_dotted(tree, key, _parse_value(text))
        sources[key] = f"override '{item}'"
    return tree, sources


def _explain(exc: ValidationError, sources: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or True)
        # model-level validators report the section only; their message names the keys.
        source = sources.get(loc)
        if source is None:
            matches = [s for k, s in sources.items() if k.startswith(f"{loc}.")] if loc else []
            source = matches[0] if matches else "recipe or defaults"
        value = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"  {loc or 'settings'}: {err['msg']}{value} [from {source}]")
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
        sources.update({k: "the checkpoint's settings" for k in _flatten(tree)})
    if recipe is not None:
        tree = load_recipe_tree(recipe)
        sources.update({k: f"recipe '{recipe}'" for k in _flatten(tree)})
    env, env_sources = env_tree(environ)
    cli, cli_sources = overrides_tree(overrides)
    sources.update(env_sources)
    sources.update(cli_sources)
    tree = _merge(_merge(tree, env), cli)
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, sources)) from None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key}")
    return out


def settings_to_yaml(settings: Settings, provenance: Mapping[str, Any] | None = None) -> str:
    """The resolved settings as a re-runnable recipe (`--recipe runs/X/resolved_config.yaml`)."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    if provenance:
        data = {"provenance": dict(provenance), **data}
    return yaml.safe_dump(data, sort_keys=False)
