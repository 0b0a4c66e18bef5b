"""Fleet telemetry over time per profile and/or model, in time buckets for the dashboard's charts.

The bucket width is chosen from the range so that a series has at most `points` buckets, and
at most MAX_SERIES series are returned (the most served first): the answer's size depends on
the range asked for, never on the number of devices (docs/http-api.md, "Fleet series").
It reads the fleet rollup: O(hours × series) rows for buckets of whole hours (folded hours and
the minutes at the edges), O(minutes × series) for finer ones, whatever the fleet's size;
`source="minutes"` reads rollup minutes only, `source="records"` every stored record: the
references the rollup is tested and benchmarked against (docs/telemetry.md, "Fleet rollup").
"""

from __future__ import annotations

import math
from typing import Any, Literal

from controller.fleet.telemetry.reports import (
    NO_PROFILE,
    merge_sums,
    model_label,
    model_names,
    summarize,
)
from controller.storage.db import Database
from controller.storage.queries import fleet as fleet_queries
from controller.storage.queries import telemetry as q

SeriesBy = Literal["profile", "model", "profile_model"]
SeriesSource = Literal["rollup", "minutes", "records"]
SERIES_BY: tuple[str, ...] = ("profile", "model", "profile_model")

# Bucket widths in seconds, each a whole number of minutes (per-minute aggregates are the
# finest data kept past raw retention): the smallest that fits the range in `points` is used.
BUCKETS_S = (
    60, 120, 300, 600, 900, 1800, 3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86_400,
    2 * 86_400, 7 * 86_400, 30 * 86_400,
)  # fmt: skip
# Default and allowed buckets per series: 120 is one point per ~4 px of a 560 px chart.
DEFAULT_POINTS = 120
MIN_POINTS, MAX_POINTS = 10, 1000
# Most series in one answer (the most served kept); each is one line per chart.
MAX_SERIES = 12
# Values of a point, as summarize() names them.
POINT_FIELDS = ("served", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "power_w",
                "energy_mj_per_inference")  # fmt: skip


def buckets_touched(since: float, until: float, width: int) -> int:
    """How many epoch-aligned buckets of `width` seconds [since, until) touches."""
    return math.floor(max(until - 1e-6, since) / width) - math.floor(since / width) + 1


def choose_bucket(since: float, until: float, points: int) -> int:
    """The narrowest width of BUCKETS_S whose aligned buckets cover the range in `points`."""
    for width in BUCKETS_S:
        if buckets_touched(since, until, width) <= points:
            return width
    width = math.ceil((until - since) / max(points - 1, 1) / 86_400) * 86_400  # whole days
    while buckets_touched(since, until, width) > points:
        width += 86_400
    return width


def _matches(label: str, sha: str, model: str | None) -> bool:
    """Whether a model passes a `NAME`, `NAME:VERSION` or sha-prefix (6+ hex) filter."""
    if model is None:
        return True
    if ":" in model:
        return label == model
    return label.split(":", 1)[0] == model or (len(model) >= 6 and sha.startswith(model))


def _key(by: SeriesBy, profile: str, label: str) -> tuple[str, str]:
    """The (profile, model) a row is drawn under: '*' where `by` merges it away."""
    return (profile if by != "model" else "*", label if by != "profile" else "*")


def fleet_series(
    db: Database,
    *,
    since: float | None,
    until: float,
    by: SeriesBy = "profile_model",
    profile: str | None = None,
    model: str | None = None,
    points: int = DEFAULT_POINTS,
    source: SeriesSource = "rollup",
) -> dict[str, Any]:
    """Latency percentiles, power and energy per inference per bucket, one series per group.

    Percentiles come from the summed histograms of the bucket (exact merge, as `report`);
    power is weighted by interval, energy by inferences. `since` None = the oldest stored. The
    bucket is chosen for [oldest row in the window, until). A point's `devices` is, from the
    rollup, the most devices reporting in one minute of the bucket (from the records: the
    devices reporting in the bucket; the same at one-minute buckets).
    """
    # The range drawn starts at the oldest row in the window: a fleet that reports since ten
    # minutes gets minute buckets in a 24 h window, not one 15-minute dot. The rollup knows
    # the minute, the records the second: the same bucket and start (both floor to a bucket,
    # a whole number of minutes).
    lo = 0.0 if since is None else since
    if source != "records":
        oldest = fleet_queries.fleet_span(db.conn, lo, until)
    else:
        oldest = q.fleet_oldest(db.conn, lo, until)
    since = max(lo, until if oldest is None else oldest)
    bucket = choose_bucket(since, until, points)
    start = math.floor(since / bucket) * bucket  # whole buckets; a multiple of 60 as well
    if source != "records":
        rows = fleet_queries.fleet_series(db.conn, start, until, bucket, hours=source == "rollup")
    else:
        rows = q.fleet_series_from_records(db.conn, start, until, bucket)
    names = model_names(db)
    groups: dict[tuple[str, str], dict[float, dict[str, Any]]] = {}
    for row in rows:
        row_profile = row["profile"] or NO_PROFILE
        sha = row["model_sha256"] or ""
        label = model_label(sha, names)
        if (profile is not None and row_profile != profile) or not _matches(label, sha, model):
            continue
        bins = groups.setdefault(_key(by, row_profile, label), {})
        merged = bins.setdefault(float(row["bucket"]), {"devices": 0})
        merged["devices"] += int(row["devices"])
        merge_sums(merged, row)
    series = []
    for (group_profile, label), bins in groups.items():
        pts = []
        for ts in sorted(bins):
            s = summarize(bins[ts])
            values = {f: s[f] for f in POINT_FIELDS}
            pts.append({"ts": ts, "devices": bins[ts]["devices"], **values})
        series.append(
            {
                "key": " ".join(k for k in (group_profile, label) if k != "*"),
                "profile": None if group_profile == "*" else group_profile,
                "model": None if label == "*" else label,
                "served": sum(p["served"] for p in pts),
                "points": pts,
            }
        )
    series.sort(key=lambda s: (-s["served"], s["key"]))
    return {
        "since": float(start),
        "until": until,
        "bucket_s": bucket,
        "by": by,
        "series": sorted(series[:MAX_SERIES], key=lambda s: s["key"]),
        "omitted": max(0, len(series) - MAX_SERIES),
    }
