"""File paths in settings made absolute, so that what a run records works from any directory.

A run stores its settings in ``resolved_config.yaml`` and in every checkpoint; `paws knn-eval` and `paws finetune`
of a checkpoint read them back, possibly from another working directory. Paths given relative to where the run
was started are therefore recorded absolute. Only paths that exist are changed: ``official:1%`` split names and
files a later step will write stay as written. ``run.out_dir`` is left alone: a new run (fine-tuning, say) is
written under the directory it is started from.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from paws_cli.config.schema import Settings

#: Settings that name input files or folders.
PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("data", "path"),
    ("data", "val_path"),
    ("data", "split"),
    ("data", "root"),
    ("data", "cache_dir"),
    ("finetune", "val_split"),
)


#: Output folders: made absolute whether or not they exist yet.
OUTPUT_KEYS = (("data", "cache_dir"),)


def absolute(value: str, *, output: bool = False) -> str:
    """``value`` as an absolute path when it names an existing file or folder (or is an ``output`` folder)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    return str(path.resolve()) if output or path.exists() else value


def absolute_path_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a settings tree (dumped settings) with the path settings made absolute."""
    out = copy.deepcopy(dict(tree))
    for section, key in PATH_KEYS:
        node = out.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key]:
            node[key] = absolute(node[key], output=(section, key) in OUTPUT_KEYS)
    return out


def with_absolute_paths(settings: Settings) -> Settings:
    """``settings`` with every existing input path absolute (see the module doc)."""
    updates: dict[str, dict[str, Any]] = {}
    for section, key in PATH_KEYS:
        value = getattr(getattr(settings, section), key)
        new = (
            absolute(value, output=(section, key) in OUTPUT_KEYS)
            if isinstance(value, str) and value
            else value
        )
        if new != value:
            updates.setdefault(section, {})[key] = new
    if not updates:
        return settings
    changed = {name: getattr(settings, name).model_copy(update=values) for name, values in updates.items()}
    return settings.model_copy(update=changed)
