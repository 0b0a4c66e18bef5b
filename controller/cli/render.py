"""Plain-text tables and JSON output for the CLI (every listing also has --json)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Left-aligned columns sized to their widest cell."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def as_json(data: Any) -> str:
    """Indented JSON with stable key order."""
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def short(sha: str | None) -> str:
    """First 12 hex digits of a digest, or '-'."""
    return sha[:12] if sha else "-"


def num(value: float | None, digits: int = 2) -> str:
    """A number with fixed decimals, or '-'."""
    return "-" if value is None else f"{value:.{digits}f}"
