"""Plain-text tables and human-readable counts for what the command line prints."""

from __future__ import annotations

import math


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).rjust(w) for cell, w in zip(row, widths)) for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human(count: float, unit: str = "") -> str:
    for suffix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{suffix}{unit}"
    return f"{count:.0f}{unit}"


def figure(value: float, digits: int = 4) -> str:
    """A measured or predicted quantity to `digits` significant digits without an exponent, so that
    neither a giant model's step (106024 ms) carries three decimals of noise nor a slow device's
    throughput (0.004100 samples/s) rounds to a false 0.0."""
    if value == 0 or not math.isfinite(value):
        return f"{value:.0f}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"
