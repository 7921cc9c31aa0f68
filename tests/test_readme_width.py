"""The README's code blocks read at 80 columns: no command, comment or code line is wider (prose may be)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^\s*```")
WIDTH = 80


def code_block_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a fenced block (indented fences of list items included)."""
    lines, inside = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if inside:
            lines.append((number, line))
    assert not inside, "README.md ends inside a code block"
    return lines


def test_parser_reads_indented_fences() -> None:
    text = "a\n```bash\nx\n```\n- item\n\n  ```python\n  y = 1\n  ```\nprose " + "w" * 100 + "\n"
    assert code_block_lines(text) == [(3, "x"), (8, "  y = 1")]


def test_every_code_block_line_fits_80_columns() -> None:
    lines = code_block_lines(README.read_text(encoding="utf-8"))
    assert len(lines) > 100, "the README's code blocks were not found"
    wide = [
        f"README.md:{number} ({len(line)} columns): {line}" for number, line in lines if len(line) > WIDTH
    ]
    assert not wide, (
        "code lines wider than 80 columns (wrap commands with \\, comments above):\n" + "\n".join(wide)
    )
