"""The HTML of the report pages: one self-contained page (inline CSS, no script, no external
link), its tables and figures, and the run folder's JSON files read for them."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_value", "html_cell", "html_figure", "html_page", "html_table", "read_json"]

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9em; }
"""


def read_json(path: Path) -> Any:
    """The JSON value in ``path``, or ``None`` when there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise ValueError(f"{path} is not valid JSON") from None


def format_value(value: Any, digits: int = 4) -> str:
    """A number for a table cell: ``digits`` decimals for floats, a dash when missing or not
    finite."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def html_table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """A table of cells already in HTML, with an escaped header row."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = "".join(f"<td>{cell}</td>" for cell in row)
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def html_cell(text: str) -> str:
    """Escaped text; leading spaces (sub-items) kept as an indent."""
    stripped = text.lstrip(" ")
    return "&emsp;" * ((len(text) - len(stripped)) // 2) + html.escape(stripped)


def html_figure(name: str, caption: str) -> str:
    """An image beside the page (relative link ``name``) with its caption."""
    return (
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def html_page(title: str, body: Sequence[str]) -> str:
    """A whole page: ``title`` as its title and heading, then the ``body`` fragments."""
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_STYLE}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            *body,
            "</body></html>",
            "",
        ]
    )
