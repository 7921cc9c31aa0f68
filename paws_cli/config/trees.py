"""Settings as plain nested dicts: merging layers, dotted keys, and reading trees written by earlier versions.

The one home of these helpers: the settings loader, checkpoint loading and resume all use them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def merge_trees(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (nested mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def flatten_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every leaf of ``tree`` as a dotted key ('optim.lr')."""
    out: list[str] = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.extend(flatten_keys(value, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key}")
    return out


def lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` ('optim.lr'), or an empty dict when a part is missing."""
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    return node


def upgrade_saved_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Settings saved in a checkpoint by a version before method sections, in today's layout.

    Checkpoints are the user's results and must stay readable: their ``loss:`` section moves to ``paws:`` and
    their ``support:`` section to the section of the method they trained. (Recipes are not upgraded: an old key
    in a recipe or an override is an error naming the new key, see ``config.loader.MOVED_KEYS``.)
    """
    out = copy.deepcopy(dict(tree))
    loss, support = out.pop("loss", None), out.pop("support", None)
    method = str(out.get("method", "paws"))
    if loss:
        out["paws"] = merge_trees(dict(loss), out.get("paws", {}))
    if support:
        out[method] = merge_trees(dict(support), out.get(method, {}))
    return out
