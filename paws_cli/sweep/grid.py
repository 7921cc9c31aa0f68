"""Sweep axes (``KEY=V1,V2,...``) and the trials of their grid, each with a stable id.

Values are split on commas outside brackets, braces and quotes, so a list value stays whole:
``augment.large_scale=[0.3,1.0],[0.5,1.0]`` has two values. Each value is then read exactly like a
``key=value`` override (YAML: ``0.3`` is a float, ``[0.3,1.0]`` a list, ``null`` None). A key with one value is
a fixed override of every trial.

A trial's id is a readable part (the values of the keys that vary) plus 8 hex digits of a hash of all its
overrides, values compared after parsing (``0.50`` and ``0.5`` are the same trial). The same command therefore
gives the same ids, which is how an interrupted sweep finds its finished trials and run directories.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from paws_cli.config import ConfigError, setting_paths

__all__ = ["Axis", "Trial", "grid_trials", "parse_axes", "parse_value", "split_values", "trial_from_params"]

#: Keys the sweep sets itself (run directories) or that must be equal for trials to be compared.
RESERVED = {"run.name": "the sweep names each trial's run directory itself"}
SHARED = {
    "run.out_dir": "all trials live in one sweep directory",
    "eval.val_images": "every trial must be scored on the same validation split",
    "eval.val_seed": "every trial must be scored on the same validation split",
}
_OPEN, _CLOSE = "[{(", "]})"


def split_values(text: str) -> list[str]:
    """``'1,[2,3],"a,b"'`` -> ``['1', '[2,3]', '"a,b"']``: commas split only outside brackets and quotes."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced '{ch}' in sweep values {text!r}")
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    if depth or quote:
        raise ValueError(f"unclosed bracket or quote in sweep values {text!r}")
    values.append(text[start:].strip())
    return values


def parse_value(text: str) -> Any:
    """A value as ``key=value`` overrides read it (YAML scalar or list; unparseable text stays a string)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _numbers_as_floats(value: Any) -> Any:
    if isinstance(value, list):
        return [_numbers_as_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers_as_floats(v) for k, v in value.items()}
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _canonical(text: str) -> str:
    """The value's identity: parsed, numbers as floats (``1`` and ``1.0`` configure the same)."""
    return json.dumps(_numbers_as_floats(parse_value(text)), sort_keys=True, default=str)


def _readable(text: str) -> str:
    """A value as trial ids show it: a string as it is, a number in its canonical form (``0.50`` -> 0.5), a
    list's items joined by '+'."""
    value = _numbers_as_floats(parse_value(text))
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [0.3, 1.0] -> 0.3+1.0
        return "+".join(json.dumps(v, sort_keys=True, default=str) for v in value)
    return json.dumps(value, sort_keys=True, default=str)


@dataclass(frozen=True)
class Axis:
    """One swept setting and its values, as given on the command line."""

    key: str
    values: tuple[str, ...]

    @property
    def varies(self) -> bool:
        return len(self.values) > 1


def parse_axes(args: Sequence[str]) -> list[Axis]:
    """``["optim.lr=0.5,1", "paws.tau=0.1"]`` -> axes, checked: known keys, no key twice, no empty or repeated
    value, no key the sweep reserves."""
    known = setting_paths()
    axes: list[Axis] = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"sweep axis '{arg}' is not KEY=V1,V2,... (e.g. optim.lr=0.5,1.0)")
        key, text = (part.strip() for part in arg.split("=", 1))
        if key not in known:
            raise ConfigError(f"unknown setting '{key}' in sweep axis '{arg}' (see `paws settings`)")
        if key in RESERVED:
            raise ConfigError(f"'{key}' cannot be swept: {RESERVED[key]}")
        if any(a.key == key for a in axes):
            raise ConfigError(f"sweep key '{key}' is given twice; list all its values in one KEY=V1,V2,...")
        values = tuple(split_values(text))
        if any(not v for v in values):
            raise ConfigError(f"sweep axis '{arg}' has an empty value (two commas, or one at an end)")
        canon = [_canonical(v) for v in values]
        if len(set(canon)) != len(canon):
            raise ConfigError(f"sweep axis '{arg}' lists a value twice")
        if key in SHARED and len(values) > 1:
            raise ConfigError(f"'{key}' takes one value in a sweep: {SHARED[key]}")
        axes.append(Axis(key, values))
    return axes


@dataclass(frozen=True)
class Trial:
    """One point of the grid: a value for every axis (in axis order)."""

    values: tuple[tuple[str, str], ...]  # (key, value text)

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={text}" for key, text in self.values]

    def swept(self, axes: Sequence[Axis]) -> dict[str, str]:
        """The values of the keys that vary in ``axes`` (what tells this trial from the others)."""
        varying = {a.key for a in axes if a.varies}
        return {k: v for k, v in self.values if k in varying}

    def trial_id(self, axes: Sequence[Axis]) -> str:
        digest = hashlib.sha1(
            json.dumps(sorted((k, _canonical(v)) for k, v in self.values)).encode()
        ).hexdigest()[:8]
        parts = [f"{key.rsplit('.', 1)[-1]}={_readable(text)}" for key, text in self.swept(axes).items()]
        readable = re.sub(r"[^A-Za-z0-9.+=-]+", "_", "_".join(parts)).strip("_")[:80] or "trial"
        return f"{readable}-{digest}"


def grid_trials(axes: Sequence[Axis]) -> list[Trial]:
    """Every combination of the axes' values, the first axis varying slowest."""
    keys = [a.key for a in axes]
    return [
        Trial(tuple(zip(keys, combo, strict=True))) for combo in itertools.product(*(a.values for a in axes))
    ]


def trial_from_params(axes: Sequence[Axis], params: dict[str, str]) -> Trial:
    """The trial with ``params`` for the varying keys and the fixed keys' single values."""
    return Trial(tuple((a.key, params[a.key] if a.varies else a.values[0]) for a in axes))
