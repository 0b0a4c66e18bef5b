"""Progress on stderr: a rich bar with counts and elapsed time on a terminal, plain lines
otherwise, so scripts and CI logs stay line-oriented (docs/cli.md, "Progress and noise")."""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

# Redraws per second of a bar: the numbers behind it change every second or slower.
REFRESH_PER_S = 4.0


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal that can redraw a line (a bar there; lines
    into a pipe, a file, or a `TERM=dumb` terminal such as an editor's shell buffer)."""
    if os.environ.get("TERM", "") in ("dumb", "unknown"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream (tests, daemons)
        return False


class ProgressDisplay:
    """Bars with `done/total` and elapsed time on a terminal; on anything else, the plain line
    each caller already prints."""

    def __init__(self, *, terminal: bool | None = None, console: Console | None = None) -> None:
        """A bar display when `terminal` (default: stderr is one), else line mode."""
        self.terminal = stderr_is_terminal() if terminal is None else terminal
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        if self.terminal:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                console=console or Console(stderr=True, highlight=False, markup=False),
                refresh_per_second=REFRESH_PER_S,
                transient=False,
            )

    def __enter__(self) -> ProgressDisplay:
        """Start drawing (a no-op in line mode)."""
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Draw the last state and stop (the bar stays on screen as the record of the run)."""
        if self._progress is not None:
            self._progress.stop()

    def update(
        self,
        key: str,
        *,
        description: str,
        completed: int,
        total: int,
        unit: str = "",
        line: str | None = None,
    ) -> None:
        """Move bar `key` (made on first use); in line mode print `line` instead, if given."""
        if self._progress is None:
            if line is not None:
                typer.echo(line, err=True)
            return
        fields: dict[str, Any] = {"unit": unit}
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(
                description, total=max(total, 0), completed=completed, **fields
            )
        else:
            self._progress.update(
                self._tasks[key],
                description=description,
                completed=completed,
                total=max(total, 0),
                **fields,
            )

    def note(self, text: str) -> None:
        """A line that belongs in the log either way (above the bars on a terminal)."""
        if self._progress is None:
            typer.echo(text, err=True)
        else:
            self._progress.console.print(text, markup=False, highlight=False)

    def refresh(self) -> None:
        """Redraw now (before a slow step, so the bar shows what it waits for)."""
        if self._progress is not None:
            self._progress.refresh()
