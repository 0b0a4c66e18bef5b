"""Filters, limits and `showing N of M` for long listings, and the human `devices` views."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from controller.cli.render import ms, num, short, table
from controller.fleet.telemetry.reports import model_label

# Rows a human table shows unless --limit says otherwise: a screenful and a half; --json shows
# every row unless --limit is given (scripts want everything).
DEFAULT_LIMIT = 50

StateFilter = Annotated[
    list[str] | None,
    typer.Option("--state", help="only rows in this state (repeatable; comma = union)"),
]
ProfileFilter = Annotated[
    list[str] | None,
    typer.Option("--profile", help="only devices of this profile (repeatable; comma = union)"),
]
LimitOption = Annotated[
    int | None,
    typer.Option(
        "--limit", min=0, help=f"at most N rows (tables: {DEFAULT_LIMIT} by default; 0 = all)"
    ),
]


def _values(option: list[str] | None) -> set[str]:
    """`--state a,b --state c` -> {a, b, c}."""
    return {v.strip() for o in option or [] for v in o.split(",") if v.strip()}


def select(
    rows: Sequence[dict[str, Any]],
    *,
    states: list[str] | None,
    state_of: Callable[[dict[str, Any]], set[str]],
    profiles: list[str] | None = None,
    limit: int | None,
    json_out: bool,
) -> tuple[list[dict[str, Any]], int]:
    """The rows that pass the filters, cut at the limit; and how many passed in all."""
    wanted_states, wanted_profiles = _values(states), _values(profiles)
    matched = [
        r
        for r in rows
        if (not wanted_states or state_of(r) & wanted_states)
        and (not wanted_profiles or r.get("profile") in wanted_profiles)
    ]
    cap = (0 if json_out else DEFAULT_LIMIT) if limit is None else limit
    return (matched[:cap] if cap else matched), len(matched)


def showing(shown: int, matched: int, total: int, noun: str) -> str | None:
    """`showing 50 of 209 devices; --limit 0 for all`, or None when every row is shown."""
    if shown == total:
        return None
    if shown == matched:
        return f"{matched} of {total} {noun} match the filters"
    of = f"{matched} matching ({total} {noun})" if matched != total else f"{total} {noun}"
    return f"showing {shown} of {of}; --limit 0 for all"


def devices_table(rows: Sequence[dict[str, Any]], labels: dict[str, str]) -> str:
    """`devices list` as a table, models as name:version."""
    return table(
        [
            (
                d["id"],
                d["profile"] or "?",
                "online" if d["online"] else "offline",
                d["state"],
                model_label(d["model_sha256"], labels),
                d["runtime"] or "-",
                d["runtime_version"] or "-",
            )
            for d in rows
        ],
        ["DEVICE", "PROFILE", "LINK", "STATE", "MODEL", "RUNTIME", "VERSION"],
    )


def _plain(value: object) -> str:
    """A value for a human: '-' for nothing, yes/no, `k=v, …` for a mapping."""
    if value is None or value == "" or value == {} or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in sorted(value.items()))
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def device_lines(detail: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """`devices show` as `key  value` lines and a benchmark table: no dicts, no None."""
    model = detail["model_sha256"]
    fields = [
        ("device", detail["id"]),
        ("profile", detail["profile"]),
        ("profile match", detail["profile_reason"]),
        ("online", detail["online"]),
        ("state", detail["state"]),
        ("status detail", detail["status_detail"]),
        ("model", f"{model_label(model, labels)} ({short(model)})" if model else None),
        ("previous model", model_label(detail["previous_sha256"], labels)),
        ("runtime", f"{detail['runtime'] or ''} {detail['runtime_version'] or ''}".strip()),
        ("agent version", detail["agent_version"]),
    ]
    lines = [f"{key:16} {_plain(value)}" for key, value in fields]
    facts = detail.get("facts") or {}
    if facts:
        lines.append("facts:")
        lines += [f"  {k:14} {_plain(v)}" for k, v in sorted(facts.items())]
    if detail["benchmarks"]:
        lines += ["", "benchmarks:"]
        lines.append(
            table(
                [
                    (
                        model_label(b["model_sha256"], labels),
                        ms(b["p50_ms"]),
                        ms(b["p99_ms"]),
                        num(b["peak_rss_mb"], 1),
                        num(b["power_w"]),
                        b["power_source"],
                    )
                    for b in detail["benchmarks"]
                ],
                ["MODEL", "P50", "P99", "PEAK RSS MB", "POWER W", "SOURCE"],
            )
        )
    return lines
