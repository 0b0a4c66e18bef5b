"""`edgefleet telemetry DEVICE` and `edgefleet report`: stored telemetry as tables, JSON, PNG."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.cli.common import HomeOption, JsonOption
from controller.cli.render import as_json, num, table
from controller.errors import FleetError
from controller.fleet.registry import Fleet, default_home
from controller.fleet.telemetry.queries import device_telemetry, fleet_report, parse_since

SinceOption = Annotated[
    str | None,
    typer.Option(help="start of the time range: 90s, 30m, 1h, 2d, 1w ago; ISO 8601; or epoch"),
]


def _fail(exc: Exception) -> typer.Exit:
    """Print a clear error and return the exit (code 2) to raise."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def _when(ts: float) -> str:
    """UTC time for tables, to the second."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def telemetry(
    device_id: Annotated[str, typer.Argument(help="device id")],
    since: SinceOption = None,
    limit: Annotated[int, typer.Option(help="newest N records (raw or per-minute)")] = 50,
    plot: Annotated[
        Path | None, typer.Option(help="also write latency/power over time to this PNG")
    ] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show a device's telemetry: raw records, then per-minute aggregates once compacted."""
    from controller.fleet.telemetry.plots import plot_device

    fleet = Fleet(home or default_home())
    try:
        start = parse_since(since)
        found = device_telemetry(fleet, device_id, since=start, limit=limit)
        plotted = plot_device(fleet.db, device_id, plot, since=start) if plot else None
    except FleetError as exc:
        raise _fail(exc) from None
    finally:
        fleet.close()
    cursor, gaps, rows = found["cursor"], found["gaps"], found["records"]
    if json_out:
        typer.echo(as_json({**found, "plot": str(plotted) if plotted else None}))
        return
    typer.echo(
        table(
            [
                (
                    _when(r["ts"]),
                    r["resolution"],
                    r["seq"] if r["resolution"] == "raw" else f"{r['seq_first']}-{r['seq_last']}",
                    r["model"],
                    r["served"],
                    num(r["p50_ms"], 3),
                    num(r["p95_ms"], 3),
                    num(r["p99_ms"], 3),
                    num(r["mean_ms"], 3),
                    num(r["rss_mb"], 1),
                    num(r["cpu_percent"], 0),
                    num(r["power_w"], 2),
                    num(r["energy_mj_per_inference"], 2),
                    (r["power_source"] or "-") + ("*" if r["power_estimated"] else ""),
                    r["errors"],
                )
                for r in rows
            ],
            [
                "TIME (UTC)",
                "RES",
                "SEQ",
                "MODEL",
                "SERVED",
                "P50 MS",
                "P95 MS",
                "P99 MS",
                "MEAN MS",
                "RSS MB",
                "CPU %",
                "POWER W",
                "MJ/INF",
                "SOURCE",
                "ERRORS",
            ],
        )
    )
    missing = [g for g in gaps if g["state"] == "missing"]
    lost = sum(g["seq_last"] - g["seq_first"] + 1 for g in gaps if g["state"] == "lost")
    if cursor:
        typer.echo(
            f"\nseq: highest {cursor['highest']}, complete up to {cursor['contiguous']}; "
            f"{len(missing)} gap(s) open "
            f"({sum(g['seq_last'] - g['seq_first'] + 1 for g in missing)} records), "
            f"{lost} lost; {cursor['duplicates']} duplicates ignored; "
            f"device dropped {cursor['dropped_total']}"
        )
    typer.echo("* power estimated from the profile's power model, not measured")
    if plotted:
        typer.echo(f"plot: {plotted}")


def report(
    model: Annotated[
        str | None, typer.Option(help="only this model: NAME or NAME:VERSION (or sha prefix)")
    ] = None,
    by: Annotated[str, typer.Option(help="group rows by 'profile' or 'device'")] = "profile",
    profile: Annotated[str | None, typer.Option(help="only devices of this profile")] = None,
    since: SinceOption = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="write the --profile's latency/power over time to this PNG"),
    ] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Inference cost per profile (or device) × model version, beside on-device benchmarks."""
    from controller.fleet.telemetry.plots import plot_profile

    if plot is not None and profile is None:
        raise _fail(FleetError("--plot needs --profile (the profile to plot)"))
    fleet = Fleet(home or default_home())
    try:
        start = parse_since(since)
        rows = fleet_report(fleet, model=model, by=by, since=start, profile=profile)
        plotted = plot_profile(fleet.db, profile, plot, since=start) if plot and profile else None
    except FleetError as exc:
        raise _fail(exc) from None
    finally:
        fleet.close()
    if json_out:
        typer.echo(as_json({"rows": rows, "plot": str(plotted) if plotted else None}))
        return
    if not rows:
        typer.echo("no telemetry in this range")
    else:
        typer.echo(report_table(rows, by))
    if plotted:
        typer.echo(f"plot: {plotted}")


def report_table(rows: list[dict[str, Any]], by: str) -> str:
    """The report as a text table with its legend (also printed by `edgefleet demo`)."""
    return (
        table([_report_row(r, by) for r in rows], _report_headers(by))
        + "\np50/p95/p99 from merged latency histograms (interpolated within a bucket); "
        "BENCH = median on-device benchmark; * = power estimated"
    )


def _report_headers(by: str) -> list[str]:
    """Column headers of the report table."""
    first = ["DEVICE", "PROFILE"] if by == "device" else ["PROFILE"]
    return [
        *first,
        "MODEL",
        "DEVICES",
        "INFERENCES",
        "P50 MS",
        "P95 MS",
        "P99 MS",
        "MEAN MS",
        "BENCH P50",
        "BENCH P95",
        "RSS MB",
        "PEAK MB",
        "POWER W",
        "MJ/INF",
        "SOURCE",
    ]


def _report_row(r: dict[str, Any], by: str) -> tuple[object, ...]:
    """One table row of the report."""
    first = (r["device"], r["profile"]) if by == "device" else (r["profile"],)
    sources = ",".join(r["power_sources"]) or "-"
    return (
        *first,
        r["model"],
        r["devices"],
        r["inferences"],
        num(r["p50_ms"], 3),
        num(r["p95_ms"], 3),
        num(r["p99_ms"], 3),
        num(r["mean_ms"], 3),
        num(r["bench_p50_ms"], 3),
        num(r["bench_p95_ms"], 3),
        num(r["mean_rss_mb"], 1),
        num(r["peak_rss_mb"], 1),
        num(r["mean_power_w"], 2),
        num(r["energy_mj_per_inference"], 2),
        sources + ("*" if r["power_estimated"] else ""),
    )
