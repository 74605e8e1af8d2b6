"""Every table the project prints or writes: one function, two renderings.

``format_table(header, rows)`` is the fixed-width table of the terminal and the logs (stage
summaries, ``fed-distill compare``, the benchmarks); ``format_table(..., markdown=True)`` (or
:func:`md_table`) is the GitHub-flavoured table of ``report.md`` and ``compare.md``. Imports
nothing heavy, so a command that only reads JSON and prints tables starts fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(
    header: Sequence[Any], rows: Sequence[Sequence[Any]], markdown: bool = False
) -> str:
    """A table of ``rows`` under ``header``: fixed-width with right-aligned columns (readable in
    logs and terminals alike), or markdown with the numeric columns right-aligned."""
    if markdown:
        return _markdown(header, rows)
    cells = [[str(h) for h in header]] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (numbers right-aligned)."""
    return format_table(header, rows, markdown=True)


def _markdown(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    align = [
        "---:" if rows and all(_looks_numeric(r[j]) for r in rows) else "---"
        for j in range(len(header))
    ]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _looks_numeric(v: Any) -> bool:
    """A number, a blank or dash, ``12.3 s``, ``45.6%`` or ``12.3 ± 0.4``: right-aligned."""
    for part in str(v).split("±"):
        s = part.strip().removesuffix(" s").removesuffix("%").lstrip("+-").replace("—", "")
        if not (s.replace(".", "", 1).isdigit() or s == ""):
            return False
    return True
