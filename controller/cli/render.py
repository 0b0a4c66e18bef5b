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
    """Columns sized to their cells; long cells wrap within the terminal width, none is cut."""
    out = console()
    grid = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if out.color_system else "",
    )
    for i, header in enumerate(headers):
        cells = ["" if r[i] is None else str(r[i]) for r in rows]
        prose = any(" " in c and len(c) > WRAP_MIN_CHARS for c in cells)
        grid.add_column(header, overflow="fold", no_wrap=not prose)
    for row in rows:
        grid.add_row(*(_cell(c, out.color_system is not None) for c in row))
    with out.capture() as captured:
        out.print(grid)
    return "\n".join(line.rstrip() for line in captured.get().rstrip("\n").splitlines())


def _cell(value: object, colour: bool) -> Text:
    """One cell as text, coloured by its state value when colour is on."""
    text = "" if value is None else str(value)
    return Text(text, style=STATE_STYLES.get(text, "") if colour else "")


def as_json(data: Any) -> str:
    """Indented JSON with stable key order."""
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def short(sha: str | None) -> str:
    """First 12 hex digits of a digest, or '-'."""
    return sha[:12] if sha else "-"


def num(value: float | None, digits: int = 2) -> str:
    """A number with fixed decimals, or '-'."""
    return "-" if value is None else f"{value:.{digits}f}"
