"""Markdown table cells: the matrix and regression tables and CI's job summary."""

from __future__ import annotations


def cell(text: object, limit: int | None = None) -> str:
    """Text safe inside one table cell: one line, "|" escaped, at most `limit` characters."""
    flat = " ".join(str(text).split())
    if limit is not None and len(flat) > limit:
        flat = flat[:limit - 1] + "…"
    return flat.replace("|", "\\|")
