"""Text for the terminal: widths in columns (wide characters take two), names and
paths fitted to a width with one ``…``, control characters made visible."""

from __future__ import annotations

import unicodedata

__all__ = ["cell", "cells", "fit", "printable"]


def printable(text: str) -> str:
    """Control characters (a newline or escape sequence in a file name) shown as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


def cells(text: str) -> int:
    """Terminal columns ``text`` takes (East Asian wide characters take two)."""
    return sum(
        2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1
        for c in text
    )


def cell(text: str, width: int) -> str:
    """``text`` fitted and padded to exactly ``width`` terminal columns."""
    text = fit(text, width)
    return text + " " * (width - cells(text))


def fit(text: str, width: int, cut: str = "middle") -> str:
    """``text`` in ``width`` columns: too long, its ``middle``, ``end`` or ``start`` is
    replaced by one ``…`` (the middle keeps a name's suffix, the start a path's end)."""
    if cells(text) <= width:
        return text
    room = max(width - 1, 0)
    if cut == "end":
        return _take(text, room) + "…"
    if cut == "start":
        return "…" + _take(text[::-1], room)[::-1]
    head = _take(text, room - room // 2)
    return head + "…" + _take(text[::-1], room // 2)[::-1]


def _take(text: str, width: int) -> str:
    out, used = [], 0
    for c in text:
        used += cells(c)
        if used > width:
            break
        out.append(c)
    return "".join(out)
