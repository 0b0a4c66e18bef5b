"""PNG plots of a device's or a profile's telemetry over time (matplotlib, headless)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.errors import FleetError
from controller.fleet.telemetry.reports import device_series, profile_series
from controller.storage.db import Database

# Latency axis turns logarithmic when the plotted values span more than this factor, so a
# 0.2 ms and a 200 ms model stay readable on one plot; below it a linear axis from 0 reads better.
LOG_SCALE_RATIO = 20.0


# ---------------------------------------------------------------------------- plots
def model_changes(points: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(time, model) where a model starts serving: its first bin, or its first after a pause."""
    by_bin: dict[float, set[str]] = {}
    for p in points:
        by_bin.setdefault(p["ts"], set()).add(p["model"])
    changes: list[tuple[float, str]] = []
    previous: set[str] = set()
    for ts in sorted(by_bin):
        changes += [(ts, m) for m in sorted(by_bin[ts] - previous)]
        previous = by_bin[ts]
    return changes


def _with_breaks(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert an empty point where a series skips bins, so the line breaks instead of bridging."""
    out: list[dict[str, Any]] = []
    for p in points:
        if out and p["ts"] - out[-1]["ts"] > p["bin_s"]:
            out.append({"ts": out[-1]["ts"] + p["bin_s"]})
        out.append(p)
    return out


def plot_series(points: list[dict[str, Any]], title: str, path: Path) -> Path:
    """PNG: p50/p95 latency per model (top, log scale) and power (bottom), model changes marked."""
    if not points:
        raise FleetError(f"no telemetry to plot for {title}")
    import matplotlib.dates as mdates
    import matplotlib.ticker as ticker
    from matplotlib.figure import Figure

    def when(ts: float) -> datetime:
        """Epoch seconds as an aware UTC datetime for the time axis."""
        return datetime.fromtimestamp(ts, UTC)

    fig = Figure(figsize=(11, 6.5), dpi=100, layout="constrained")
    lat_ax, power_ax = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    models = list(dict.fromkeys(p["model"] for p in points))
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    any_power = False
    for m in models:
        mine = _with_breaks([p for p in points if p["model"] == m])
        xs = [when(p["ts"]) for p in mine]

        def values(key: str, rows: list[dict[str, Any]] = mine) -> list[float]:
            """A column as floats, NaN (a break in the line) where there is no value."""
            return [math.nan if r.get(key) is None else float(r[key]) for r in rows]

        lat_ax.plot(xs, values("p50_ms"), "-", color=colors[m], marker=".", label=f"{m} p50")
        lat_ax.plot(xs, values("p95_ms"), "--", color=colors[m], label=f"{m} p95")
        if any(p.get("power_w") is not None for p in mine):
            any_power = True
            power_ax.plot(xs, values("power_w"), "-", color=colors[m], marker=".", label=m)
    stacked: dict[float, int] = {}
    for ts, label in model_changes(points):
        for ax in (lat_ax, power_ax):
            ax.axvline(when(ts), color=colors[label], linestyle=":", linewidth=1.2)
        row = stacked[ts] = stacked.get(ts, -1) + 1  # labels of one bin stack downwards
        lat_ax.annotate(
            f" {label}",
            xy=(when(ts), 1.0 - 0.06 * row),
            xycoords=("data", "axes fraction"),
            va="top",
            ha="left",
            fontsize=9,
            color=colors[label],
        )
    latencies = [p[k] for p in points for k in ("p50_ms", "p95_ms") if p[k]]
    if latencies and max(latencies) / min(latencies) > LOG_SCALE_RATIO:
        lat_ax.set_yscale("log")
        lat_ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        lat_ax.set_ylabel("latency (ms, log scale)")
    else:
        lat_ax.set_ylim(bottom=0, top=max(latencies, default=1.0) * 1.15)
        lat_ax.set_ylabel("latency (ms)")
    lat_ax.grid(True, which="both", alpha=0.3)
    lat_ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    lat_ax.set_title(f"{title}: inference latency p50 / p95 and power")
    power_ax.set_ylabel("power (W)")
    power_ax.grid(True, alpha=0.3)
    if not any_power:
        power_ax.text(0.5, 0.5, "no power readings", transform=power_ax.transAxes, ha="center")
    locator = mdates.AutoDateLocator(tz=UTC)
    power_ax.xaxis.set_major_locator(locator)
    power_ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
    power_ax.set_xlabel(f"time (UTC), {points[0]['bin_s']} s bins")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_device(db: Database, device_id: str, path: Path, since: float | None = None) -> Path:
    """PNG of one device's latency and power over time, model version changes marked."""
    return plot_series(device_series(db, device_id, since), f"device {device_id}", path)


def plot_profile(db: Database, profile: str, path: Path, since: float | None = None) -> Path:
    """PNG of a profile's merged latency and power over time, model version changes marked."""
    return plot_series(profile_series(db, profile, since), f"profile {profile}", path)
