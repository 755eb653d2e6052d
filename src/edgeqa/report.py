"""Markdown for stage reports: one number formatter and one table writer, shared by every report."""

from __future__ import annotations

from typing import Any


def fmt(v: Any, digits: int = 4) -> str:
    """A value as a report shows it: None is n/a; floats keep `digits` significant digits; large integers get
    thousands separators (parameter counts)."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v).replace("|", "\\|")


def md_table(headers: list[str], rows: list[list[Any]], digits: int = 4) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v, digits) for v in r) + " |" for r in rows]
    return "\n".join(out)
