"""Plain-text tables, for the CLI and for the reports and summaries the library returns (no dependency)."""

from __future__ import annotations

from typing import Any, Sequence


def printable(value: Any, keep: str = "") -> str:
    """`value` as text safe for a terminal: control characters (escape sequences, carriage returns)
    shown escaped, except those in `keep`. What a file's author wrote (a manifest, a model's input
    names, an error quoting them) reaches the terminal through this."""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in str(value))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[printable(h) for h in headers]] + [["" if c is None else printable(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])
