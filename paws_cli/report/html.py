"""The report page: one self-contained HTML file (inline style, no scripts, nothing fetched) that shows the PNGs
beside it by relative path. Every text that comes from a run (names, settings, paths) is escaped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; } p.caption, p.note { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
"""


@dataclass(frozen=True)
class Section:
    """A heading with, in order, an image (a file name beside the page), a caption and ready-made HTML."""

    title: str
    image: str | None = None
    caption: str = ""
    body: str = ""  # HTML built by this module's helpers (its texts already escaped)


def table_html(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A table whose cells are escaped; numbers are right-aligned."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for value in row:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            text = f"{value:.2f}" if isinstance(value, float) else str(value)
            cells.append(f'<td class="num">{escape(text)}</td>' if number else f"<td>{escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def paragraph(text: str, css: str = "note") -> str:
    return f'<p class="{css}">{escape(text)}</p>'


def details(summary: str, text: str) -> str:
    """A collapsed block of preformatted text."""
    return f"<details><summary>{escape(summary)}</summary><pre>{escape(text)}</pre></details>"


def render_page(title: str, intro: Sequence[str], sections: Sequence[Section]) -> str:
    """The whole page as text."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        *(paragraph(line) for line in intro),
    ]
    for section in sections:
        parts.append(f"<h2>{escape(section.title)}</h2>")
        if section.image:
            alt = escape(section.title, quote=True)
            parts.append(f'<img src="{escape(section.image, quote=True)}" alt="{alt}">')
        if section.caption:
            parts.append(paragraph(section.caption, "caption"))
        if section.body:
            parts.append(section.body)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
