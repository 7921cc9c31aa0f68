"""What `paws recipes ls` and `paws settings` print, laid out for the console's width.

A wide console gets a table. Below the width the table needs, each entry becomes a small block instead: its
name (what users copy) on a line of its own, the numbers on the next, the description wrapped beneath. Names
and numbers are never cut with an ellipsis; only descriptions wrap.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from paws_cli.config import Settings, setting_paths
from paws_cli.config.trees import lookup

#: Narrowest description column worth a table; below it the block layout reads better.
MIN_DESCRIPTION = 32
#: Indent of a block's lines under its head line.
INDENT = 2
#: A rich table's borders and padding: 3 columns per cell plus one.
BORDER_PER_COLUMN = 3

RECIPES_TITLE = "recipes: global batch and support (classes x images) at the recipe's world size"
SETTINGS_TITLE = "settings (override with key=value or PAWS_SECTION__KEY=value)"


def _fill(chunks: Iterable[str], width: int, sep: str = ", ") -> list[str]:
    """Chunks joined by ``sep`` into lines of at most ``width`` columns; a chunk is never split."""
    lines: list[str] = []
    for chunk in chunks:
        if lines and len(lines[-1]) + len(sep) + len(chunk) <= width:
            lines[-1] += sep + chunk
        else:
            lines.append(chunk)
    return lines


def _block(head: Text, lines: list[str], description: str, width: int) -> RenderableType:
    """One entry: its head line, then lines and the description wrapped to ``width``, indented by two."""
    wrapped = textwrap.wrap(description, max(width - INDENT, 8), break_on_hyphens=False)
    # Plain lines, not rich Padding: padding would end every line with spaces up to the width.
    body = [Text(" " * INDENT + line, no_wrap=True) for line in (*lines, *wrapped)]
    return Group(head, *body)


def _fits(columns: list[int], width: int) -> bool:
    """Whether no-wrap columns this wide leave a description column of MIN_DESCRIPTION on ``width``."""
    return sum(columns) + MIN_DESCRIPTION + BORDER_PER_COLUMN * (len(columns) + 1) + 1 <= width


def recipes_view(width: int) -> RenderableType:
    """`paws recipes ls`: a table on a wide console, else a block per recipe."""
    from paws_cli.reproduce.recipe_table import listed_recipes, recipe_row

    headers = ("name", "model", "labels", "world", "batch", "support", "training")
    rows = [recipe_row(name) for name in listed_recipes()]
    cells = [
        (r.name, r.model, r.labels, str(r.world_size), str(r.global_batch), r.global_support, r.schedule)
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    if _fits(widths, width):
        table = Table(title=RECIPES_TITLE)
        for col in headers:
            table.add_column(
                col, justify="right" if col in ("world", "batch", "training") else "left", no_wrap=True
            )
        table.add_column("description", min_width=MIN_DESCRIPTION, ratio=1, overflow="fold")
        for row, cell in zip(rows, cells, strict=True):
            table.add_row(*cell, row.description)
        return table
    blocks: list[RenderableType] = [Text(RECIPES_TITLE, overflow="fold")]
    for r, c in zip(rows, cells, strict=True):
        numbers = [
            r.model,
            f"labels {r.labels}",
            f"world {c[3]}",
            f"batch {c[4]}",
            f"support {r.global_support}",
            r.schedule,
        ]
        blocks.append(Text(""))
        blocks.append(
            _block(
                Text(r.name, style="bold", no_wrap=True), _fill(numbers, width - INDENT), r.description, width
            )
        )
    return Group(*blocks)


def settings_rows(settings: Settings) -> list[tuple[str, str, str]]:
    """(key, resolved value as JSON, description) of every setting; another method's section shows its
    default, marked as such."""
    dumped = settings.model_dump(mode="json")
    rows = []
    for key, info in setting_paths().items():
        section = key.split(".", 1)[0]
        if section not in dumped:  # another method's section, absent from these settings: its default
            value: Any = info.get_default(call_default_factory=True)
            text = f"{json.dumps(value, default=list)} (method={section} only)"
        else:
            text = json.dumps(lookup(dumped, key))
        rows.append((key, text, info.description or ""))
    return rows


def settings_view(settings: Settings, width: int) -> RenderableType:
    """`paws settings`: a table on a wide console, else 'key = value' with the description beneath."""
    rows = settings_rows(settings)
    widths = [max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)]
    if _fits(widths, width):
        table = Table(title=SETTINGS_TITLE)
        table.add_column("key", style="bold", no_wrap=True)
        table.add_column("value", no_wrap=True)
        table.add_column("description", min_width=MIN_DESCRIPTION, overflow="fold")
        for key, value, description in rows:
            table.add_row(Text(key), Text(value), Text(description))
        return table
    blocks: list[RenderableType] = [Text(SETTINGS_TITLE, overflow="fold")]
    for key, value, description in rows:
        head = Text.assemble((key, "bold"), " = ", value)
        head.overflow = "fold"  # a long value (a path) wraps; the key comes first and stays whole
        blocks.append(Text(""))
        blocks.append(_block(head, [], description, width))
    return Group(*blocks)
