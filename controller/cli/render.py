"""Tables (rich: wrapped to the terminal, never cut) and JSON output (every listing has --json)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Cell values drawn in colour on a terminal (never in a pipe, never with NO_COLOR set).
STATE_STYLES = {
    **dict.fromkeys(("succeeded", "completed", "ok", "online", "running", "pass"), "green"),
    **dict.fromkeys(
        ("failed", "gate_failed", "rollback_failed", "aborted", "FAIL", "offline", "error"), "red"
    ),
    **dict.fromkeys(
        ("paused", "retrying", "rolling_back", "rolled_back", "outlier", "warn", "skipped"),
        "yellow",
    ),
}


# Width for output into a pipe or file with no COLUMNS: wide enough that no table wraps, so
# `grep` and `awk` see one line per row (rich's own default would be 80).
PIPE_WIDTH = 10_000
# A column wraps only if it holds free text: a cell with a space and longer than this; ids,
# states and numbers stay on one line.
WRAP_MIN_CHARS = 24
# Narrowest a wrapped free-text column gets (below this a sentence is one word per line); when
# even that does not fit, the table is wider than the terminal rather than losing text.
MIN_PROSE_WIDTH = 12
# Characters between two columns: rich's padding of one on each side plus the column separator.
COLUMN_GAP = 3


def console() -> Console:
    """A console for stdout: colour only on a terminal without NO_COLOR; width from COLUMNS."""
    tty = sys.stdout.isatty()
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() else (None if tty else PIPE_WIDTH)
    return Console(
        file=sys.stdout,
        width=width,
        force_terminal=tty,
        color_system="auto" if tty and "NO_COLOR" not in os.environ else None,
        markup=False,
        emoji=False,
        highlight=False,
    )


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Columns sized to their cells; free-text columns wrap within the terminal, none is cut."""
    out = console()
    texts = [["" if c is None else str(c) for c in r] for r in rows]
    widths = _widths(texts, headers, out.width)
    out.width = max(out.width, sum(widths) + COLUMN_GAP * (len(widths) - 1))
    grid = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if out.color_system else "",
    )
    for header, width in zip(headers, widths, strict=True):
        grid.add_column(header, overflow="fold", width=width)
    colour = out.color_system is not None
    for row in texts:
        grid.add_row(*(Text(c, style=STATE_STYLES.get(c, "") if colour else "") for c in row))
    with out.capture() as captured:
        out.print(grid)
    return "\n".join(line.rstrip() for line in captured.get().rstrip("\n").splitlines())


def _widths(texts: list[list[str]], headers: Sequence[str], width: int) -> list[int]:
    """Each column's width: its widest cell, narrowed only for free text when over `width`.

    Ids, states and numbers keep their full width (rich would fold `in_progress` into
    `in_pr`/`ogress`); free-text columns share what is left, at least MIN_PROSE_WIDTH each.
    """
    natural = [max([len(headers[i]), *(len(r[i]) for r in texts)]) for i in range(len(headers))]
    gaps = COLUMN_GAP * (len(headers) - 1)
    if sum(natural) + gaps <= width:
        return natural
    prose = [
        i
        for i in range(len(headers))
        if any(" " in r[i] and len(r[i]) > WRAP_MIN_CHARS for r in texts)
    ]
    fixed = sum(w for i, w in enumerate(natural) if i not in prose)
    # A wrapped column is never narrower than its longest word (nor MIN_PROSE_WIDTH, unless
    # it is narrower than that anyway); the room left is shared by how much each one wants.
    floor = {
        i: min(
            natural[i],
            max(MIN_PROSE_WIDTH, *(len(w) for r in texts for w in r[i].split())),
        )
        for i in prose
    }
    spare = width - fixed - gaps - sum(floor.values())
    want = sum(natural[i] - floor[i] for i in prose) or 1
    for i in prose:
        natural[i] = floor[i] + max(0, spare) * (natural[i] - floor[i]) // want
    return natural


def as_json(data: Any) -> str:
    """Indented JSON with stable key order."""
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def short(sha: str | None) -> str:
    """First 12 hex digits of a digest, or '-'."""
    return sha[:12] if sha else "-"


def num(value: float | None, digits: int = 2) -> str:
    """A number with fixed decimals, or '-'."""
    return "-" if value is None else f"{value:.{digits}f}"


def ms(value: float | None) -> str:
    """A duration given in ms, in the unit that keeps its digits: 7.3 µs, 12.50 ms, 1.20 s."""
    if value is None:
        return "-"
    if value < 1.0:
        return f"{value * 1000:.3g} µs"
    if value < 1000.0:
        return f"{value:.2f} ms"
    return f"{value / 1000:.2f} s"
