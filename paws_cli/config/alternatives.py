"""Settings that say one thing in two ways, resolved layer by layer (recipe < environment < overrides).

- The run's length in epochs (``optim.epochs``) or in steps (``optim.total_steps``), and the warm-up's
  (``optim.warmup_epochs`` / ``optim.warmup_steps``): the highest layer that gives one of a pair decides, so
  ``optim.total_steps=300`` on the command line replaces a recipe's ``epochs: 2.5``. One layer giving both is an
  error naming them.
- View sizes from the data (``augment.size_from_data: true``, e.g. in a recipe) or given (``augment.large_size``,
  ``augment.small_size``): sizes given in a higher layer turn a lower layer's ``size_from_data`` off.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from paws_cli.config.errors import ConfigError

#: Pairs of keys that give the same quantity in epochs or in steps.
PAIRS: tuple[tuple[str, str], ...] = (
    ("optim.epochs", "optim.total_steps"),
    ("optim.warmup_epochs", "optim.warmup_steps"),
)
SIZE_FROM_DATA = "augment.size_from_data"
VIEW_SIZES = ("augment.large_size", "augment.small_size")


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".")
    node = tree.get(section)
    return node.get(key) if isinstance(node, Mapping) else None


def _drop(tree: dict[str, Any], dotted: str) -> None:
    section, key = dotted.split(".")
    node = tree.get(section)
    if isinstance(node, dict):
        node.pop(key, None)


def resolve_alternatives(layers: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Copies of ``layers`` (lowest first; ``names`` say where each came from) with the superseded keys removed."""
    out = [copy.deepcopy(dict(layer)) for layer in layers]
    for pair in PAIRS:
        chosen: str | None = None
        for layer, name in zip(reversed(out), reversed(names), strict=True):
            given = [key for key in pair if _get(layer, key) is not None]
            if len(given) == 2:
                raise ConfigError(
                    f"{pair[0]}={_get(layer, pair[0])} and {pair[1]}={_get(layer, pair[1])} are both given by "
                    f"{name}: they are two ways to say the same length (epochs or steps); keep one"
                )
            if chosen is None and given:
                chosen = given[0]
            elif chosen is not None:
                for key in pair:
                    if key != chosen:
                        _drop(layer, key)
    sized = False
    for layer in reversed(out):
        if sized:
            _drop(layer, SIZE_FROM_DATA)
        elif _get(layer, SIZE_FROM_DATA) is None and any(_get(layer, k) is not None for k in VIEW_SIZES):
            sized = True  # explicit sizes above a size_from_data below: the sizes win
        elif _get(layer, SIZE_FROM_DATA) is not None:
            break  # this layer decides size_from_data itself
    return out
