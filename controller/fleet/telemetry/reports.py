"""Telemetry arithmetic (sum form, percentiles) and what inference costs per profile × model.

The "sum form" turns every weighted mean into a sum and its weight, so raw rows, per-minute
aggregates and whole fleets merge exactly; the store's compaction uses the same definitions.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any, Literal

from agent.protocol import BUCKET_COUNT, LATENCY_BUCKETS_MS
from controller.errors import FleetError
from controller.storage.db import Database
from controller.storage.queries import fleet as fleet_queries
from controller.storage.queries import metrics as metric_queries
from controller.storage.queries import telemetry as q

# The sum form's fields and how they merge are defined with the SQL that folds them.
from controller.storage.queries.telemetry import MAX_FIELDS, MIN_FIELDS, SUM_FIELDS

GroupBy = Literal["profile", "device"]

# Most points per plotted line: ~400 is about one per two pixels on the 11-inch plot, so finer
# bins add no detail; the bin width grows in whole minutes to stay under it.
MAX_PLOT_POINTS = 400
# Smallest series bin: per-minute aggregates are the finest data kept past raw retention.
MIN_BIN_S = 60
# Group name for devices without a profile (and telemetry from devices no longer registered).
NO_PROFILE = "?"


# Bucket columns b0..b30 of migration 4: one per LATENCY_BUCKETS_MS bound plus +Inf.
BUCKET_COLUMNS: tuple[str, ...] = tuple(f"b{i}" for i in range(BUCKET_COUNT))


def merge_sums(into: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """Merge one sum-form row into another in Python (the same rules as the SQL's)."""
    for f in SUM_FIELDS:
        into[f] = (into.get(f) or 0) + (row.get(f) or 0)
    for f in MAX_FIELDS:
        a, b = into.get(f), row.get(f)
        into[f] = b if a is None or (b is not None and b > a) else a
    for f in MIN_FIELDS:
        a, b = into.get(f), row.get(f)
        into[f] = b if a is None or (b is not None and b < a) else a
    return into


def bucket_index(latency_ms: float) -> int:
    """Index of the LATENCY_BUCKETS_MS bucket (le semantics) a latency falls in; last is +Inf."""
    return bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)


def percentile_from_buckets(
    buckets: Sequence[int], q: float, max_ms: float | None = None
) -> float | None:
    """The q-quantile (0..1) of a LATENCY_BUCKETS_MS histogram, interpolated within its bucket.

    The rank q * count falls in one bucket (lower, upper]; the estimate moves linearly from
    lower to upper with the rank inside it. The top bucket's upper edge is the observed max
    when known (the +Inf bucket has no other). The true quantile lies in the same bucket, so
    the error is at most that bucket's width (docs/telemetry.md has measurements).
    """
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    for i, n in enumerate(buckets):
        if n and cumulative + n >= rank:
            lower = LATENCY_BUCKETS_MS[i - 1] if i > 0 else 0.0
            upper = LATENCY_BUCKETS_MS[i] if i < len(LATENCY_BUCKETS_MS) else math.inf
            if max_ms is not None:
                upper = min(upper, max(max_ms, lower))
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * max(0.0, rank - cumulative) / n
        cumulative += n
    return max_ms  # pragma: no cover - rank <= total always lands in a bucket


def summarize(sums: dict[str, Any]) -> dict[str, Any]:
    """Report numbers from a sum-form row: percentiles from buckets, weighted means."""
    buckets = [int(sums.get(b) or 0) for b in BUCKET_COLUMNS]
    served = int(sums.get("served") or 0)
    interval = float(sums.get("interval_s") or 0.0)
    max_ms = sums.get("max_ms")

    def ratio(num: Any, den: float) -> float | None:
        """num / den, or None without a weight."""
        return float(num or 0.0) / den if den else None

    return {
        "records": int(sums.get("records") or 0),
        "served": served,
        "p50_ms": percentile_from_buckets(buckets, 0.50, max_ms),
        "p95_ms": percentile_from_buckets(buckets, 0.95, max_ms),
        "p99_ms": percentile_from_buckets(buckets, 0.99, max_ms),
        "mean_ms": ratio(sums.get("latency_sum_ms"), served),
        "max_ms": max_ms,
        "buckets": buckets,
        "invocations": int(sums.get("invocations") or 0),
        "throughput_ips": ratio(sums.get("throughput_sum"), interval),
        "mean_rss_mb": ratio(sums.get("rss_sum"), interval),
        "peak_rss_mb": sums.get("peak_rss_mb"),
        "cpu_percent": ratio(sums.get("cpu_sum"), interval),
        "temperature_c": ratio(sums.get("temperature_sum"), int(sums.get("temperature_n") or 0)),
        "temperature_max_c": sums.get("temperature_max"),
        "power_w": ratio(sums.get("power_sum"), float(sums.get("power_interval_s") or 0.0)),
        "energy_mj_per_inference": ratio(
            sums.get("energy_sum"), int(sums.get("energy_served") or 0)
        ),
        "power_source": sums.get("power_source") or None,
        "power_estimated": bool(sums.get("power_estimated")),
        "cache_hits": int(sums.get("cache_hits") or 0),
        "errors": int(sums.get("errors") or 0),
        "dropped_total": int(sums.get("dropped_total") or 0),
        "interval_s": interval,
    }


def model_names(db: Database) -> dict[str, str]:
    """Artifact sha256 → `name:version` of the model it was registered as (its first model)."""
    return {
        row["sha256"]: f"{row['name']}:{row['version']}"
        for row in metric_queries.artifact_names(db.conn)
    }


def model_label(sha: str | None, names: dict[str, str]) -> str:
    """`name:version` for a known artifact, the short sha for an unknown one, '-' for none."""
    if not sha:
        return "-"
    return names.get(sha, sha[:12])


def _matches(label: str, sha: str, model: str | None) -> bool:
    """Whether a row's model passes a `NAME`, `NAME:VERSION` or sha-prefix filter."""
    if model is None:
        return True
    if ":" in model:
        return label == model
    return label.split(":", 1)[0] == model or (len(model) >= 6 and sha.startswith(model))


def report(
    db: Database,
    *,
    model: str | None = None,
    by: GroupBy = "profile",
    since: float | None = None,
    profile: str | None = None,
    source: Literal["rollup", "records"] = "rollup",
) -> list[dict[str, Any]]:
    """Per profile (or device) × model version: fleet numbers beside on-device benchmarks.

    Per profile, the numbers come from the fleet rollup (cost independent of the fleet's size
    when `since` is a whole minute); per device, or with `source="records"` (the reference),
    from every stored record.

    Latency percentiles come from the summed histograms (see percentile_from_buckets); means
    are weighted: latency and energy by inferences, RSS and power by interval length.
    """
    if by not in ("profile", "device"):
        raise FleetError(f"--by must be 'profile' or 'device', got {by!r}")
    profiles = q.device_profiles(db.conn)
    names = model_names(db)
    groups: dict[tuple[str, str], dict[str, Any]] = {}

    def group_of(device_profile: str, name: str, sha: str) -> dict[str, Any] | None:
        """The group a row of this profile and model adds to, None when filtered out."""
        if profile is not None and device_profile != profile:
            return None
        label = model_label(sha, names)
        if not _matches(label, sha, model):
            return None
        group = groups.setdefault(
            (name, label), {"sums": {}, "devices": set(), "shas": set(), "sources": set()}
        )
        if sha:
            group["shas"].add(sha)
        return group

    if by == "profile" and source == "rollup":
        _fleet_groups(db, since, profiles, group_of)
        rows: list[dict[str, Any]] = []
    else:
        rows = q.report_sums(db.conn, since)
    for raw in rows:
        device, sha = raw["device_id"], raw["model_sha256"]
        device_profile = profiles.get(device) or NO_PROFILE
        group = group_of(device_profile, device_profile if by == "profile" else device, sha)
        if group is None:
            continue
        merge_sums(group["sums"], raw)
        group["devices"].add(device)
        if raw["power_source"]:
            group["sources"].add(raw["power_source"])
    benches = _benchmarks(db, {sha for g in groups.values() for sha in g["shas"]})
    out = []
    for (name, label), group in sorted(groups.items()):
        s = summarize(group["sums"])
        mine = [
            b
            for b in benches
            if b["model_sha256"] in group["shas"]
            and (
                b["device_id"] == name
                if by == "device"
                else (profiles.get(b["device_id"]) or NO_PROFILE) == name
            )
        ]
        row: dict[str, Any] = {
            by: name,
            "model": label,
            "model_sha256": sorted(group["shas"]),
            "devices": len(group["devices"]),
            "records": s["records"],
            "inferences": s["served"],
            "p50_ms": s["p50_ms"],
            "p95_ms": s["p95_ms"],
            "p99_ms": s["p99_ms"],
            "mean_ms": s["mean_ms"],
            "max_ms": s["max_ms"],
            "mean_rss_mb": s["mean_rss_mb"],
            "peak_rss_mb": s["peak_rss_mb"],
            "mean_power_w": s["power_w"],
            "energy_mj_per_inference": s["energy_mj_per_inference"],
            "power_sources": sorted(group["sources"]),
            "power_estimated": s["power_estimated"],
            "throughput_ips": s["throughput_ips"],
            "cache_hits": s["cache_hits"],
            "errors": s["errors"],
            **_bench_summary(mine),
        }
        if by == "device":
            row["profile"] = profiles.get(name) or NO_PROFILE
        out.append(row)
    return out


def _fleet_groups(
    db: Database,
    since: float | None,
    profiles: dict[str, str | None],
    group_of: Callable[[str, str, str], dict[str, Any] | None],
) -> None:
    """Fill the per-profile groups from the fleet rollup: whole minutes from
    telemetry_fleet_minute, the part of a minute before `since` cuts it from the stored records,
    devices and power sources from telemetry_device_models. O(minutes × series) and O(devices)
    rows, plus the records of at most one minute (none when `since` is a whole minute)."""
    whole = None if since is None else math.ceil(since / 60) * 60
    for row in fleet_queries.fleet_sums(db.conn, whole):
        name = row["profile"] or NO_PROFILE
        group = group_of(name, name, row["model_sha256"])
        if group is not None:
            merge_sums(group["sums"], row)
    if since is not None and whole is not None and whole > since:
        for row in q.report_sums(db.conn, since, until=whole):
            name = profiles.get(row["device_id"]) or NO_PROFILE
            group = group_of(name, name, row["model_sha256"])
            if group is not None:
                merge_sums(group["sums"], row)
                group["devices"].add(row["device_id"])
                if row["power_source"]:
                    group["sources"].add(row["power_source"])
    for pair in fleet_queries.fleet_devices(db.conn, whole):
        name = pair["profile"] or NO_PROFILE
        group = group_of(name, name, pair["model_sha256"])
        if group is not None:
            group["devices"].add(pair["device_id"])
            if pair["power_source"]:
                group["sources"].add(pair["power_source"])


def _benchmarks(db: Database, shas: set[str]) -> list[dict[str, Any]]:
    """Benchmark rows of these artifacts, each with its decoded report, oldest first."""
    if not shas:
        return []
    rows = q.benchmarks_of(db.conn, shas)
    for r in rows:
        r["report"] = json.loads(r["report"])
    return rows


def _bench_summary(benches: list[dict[str, Any]]) -> dict[str, Any]:
    """Median on-device benchmark numbers of a group, and the newest report's environment."""
    if not benches:
        return {
            "bench_reports": 0,
            "bench_p50_ms": None,
            "bench_p95_ms": None,
            "bench_peak_rss_mb": None,
            "bench_energy_mj_per_inference": None,
            "bench_environment": None,
        }
    p95s = [b["report"].get("p95_ms") for b in benches]
    return {
        "bench_reports": len(benches),
        "bench_p50_ms": statistics.median(b["p50_ms"] for b in benches),
        "bench_p95_ms": statistics.median(p for p in p95s if p is not None)
        if any(p is not None for p in p95s)
        else None,
        "bench_peak_rss_mb": statistics.median(b["peak_rss_mb"] for b in benches),
        "bench_energy_mj_per_inference": statistics.median(
            b["energy_mj_per_inference"] for b in benches
        ),
        "bench_environment": benches[-1]["report"].get("environment"),
    }


# ---------------------------------------------------------------------------- series
def _series(
    db: Database, devices: q.DeviceFilter, since: float | None, bin_s: int | None
) -> list[dict[str, Any]]:
    """Time-binned points per model for the devices `devices` selects, oldest first."""
    if bin_s is None:
        lo, hi = q.series_span(db.conn, devices, since)
        width = (hi - lo) if lo is not None else 0
        bin_s = max(MIN_BIN_S, math.ceil(width / MAX_PLOT_POINTS / MIN_BIN_S) * MIN_BIN_S)
    rows = q.series(db.conn, devices, since, bin_s)
    names = model_names(db)
    points = []
    for row in rows:
        s = summarize(row)
        points.append(
            {
                "ts": float(row["bin"]),
                "bin_s": bin_s,
                "model_sha256": row["model_sha256"] or None,
                "model": model_label(row["model_sha256"], names),
                "devices": row["devices"],
                **{
                    k: s[k]
                    for k in (
                        "records",
                        "served",
                        "p50_ms",
                        "p95_ms",
                        "p99_ms",
                        "mean_ms",
                        "max_ms",
                        "power_w",
                        "energy_mj_per_inference",
                        "mean_rss_mb",
                        "peak_rss_mb",
                        "cpu_percent",
                    )
                },
            }
        )
    return points


def device_series(
    db: Database, device_id: str, since: float | None = None, bin_s: int | None = None
) -> list[dict[str, Any]]:
    """One device's latency, power and memory per time bin and model (bins ≥ 1 minute)."""
    return _series(db, q.one_device(device_id), since, bin_s)


def profile_series(
    db: Database, profile: str, since: float | None = None, bin_s: int | None = None
) -> list[dict[str, Any]]:
    """All devices of a profile merged per time bin and model (histograms summed exactly)."""
    return _series(db, q.of_profile(profile), since, bin_s)


