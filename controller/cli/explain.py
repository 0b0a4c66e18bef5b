"""`edgefleet models explain NAME`: host and device numbers per candidate, why it won or lost."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from controller.cli.common import HomeOption, JsonOption, fail, open_fleet
from controller.cli.render import as_json, num, short, table
from controller.errors import FleetError
from controller.fleet.candidates import explain
from controller.fleet.rollout.outliers import fleet_outliers


def models_explain(
    model: Annotated[str, typer.Argument(help="NAME[:VERSION] (default: newest version)")],
    rollout: Annotated[
        str | None, typer.Option("--rollout", help="a rollout that measured candidates")
    ] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Per profile: each candidate, its host and on-device numbers, and why it won or lost."""
    try:
        result = explain(open_fleet(home), model, rollout)
    except FleetError as exc:
        raise fail(exc) from None
    if json_out:
        typer.echo(as_json(result))
        return
    typer.echo(f"model {result['model']}")
    if result["rollout"] is None:
        typer.echo("no rollout has measured its candidates on devices yet; host ranking:")
        typer.echo(_host_table(result["candidates"]))
        for line in output_lines(result["candidates"]):
            typer.echo(line)
        return
    r = result["rollout"]
    typer.echo(f"selection by rollout {r['id']} ({r['state']}, phase {r['phase']})")
    decided = {d["profile"]: d for d in result["decisions"]}
    for profile in sorted({c["profile"] for c in result["candidates"]} | set(decided)):
        typer.echo(f"\n[{profile}]")
        decision = decided.get(profile)
        if decision is None:
            typer.echo("  not decided yet (trials running or not needed)")
            continue
        typer.echo(_decision_table(decision["explanation"]))
        for note in decision["explanation"].get("notes", []):
            typer.echo(f"  note: {note}")
    for line in output_lines(result["candidates"]):
        typer.echo(line)
    for o in result["outliers"]:
        typer.echo(f"outlier: {o['device_id']} ({o['state']}): {o['reason']}")
    for f in result["fell_back"]:
        typer.echo(f"fell back: {f['device_id']}: {f['message']}")


def _host_table(candidates: list[dict[str, Any]]) -> str:
    """Registered candidates with their host numbers."""
    return table(
        [
            (
                c["profile"],
                f"#{c['rank']}",
                c["recipe"],
                c["threads"] or "-",
                short(c["sha256"]),
                c["size"],
                num(c["host"].get("latency_ms")),
                num(c["host"].get("accuracy_drop_points")),
                num(c["host"].get("snr_db")),
            )
            for c in candidates
        ],
        [
            "PROFILE",
            "RANK",
            "RECIPE",
            "THREADS",
            "SHA256",
            "BYTES",
            "HOST MS",
            "ACC DROP",
            "MIN SNR",
        ],
    )


def output_lines(candidates: list[dict[str, Any]]) -> list[str]:
    """Per candidate, every output's fidelity on the host: the worst one decided its budget."""
    lines = []
    for c in candidates:
        for o in c["host"].get("outputs") or []:
            top1 = o.get("top1_agreement")
            agree = f", top-1 {100 * top1:.1f} %" if top1 is not None else ""
            flat = " (flat fp32 reference: not judged)" if o.get("flat") else ""
            shape = "x".join(str(d) for d in o.get("shape") or []) or "scalar"
            lines.append(
                f"  {c['profile']} #{c['rank']} {c['recipe']}: output {o['index']} "
                f"'{o['name']}' [{shape}] {o['kind']}: SNR {num(o['snr_db'])} dB, cosine "
                f"{o['cosine']:.6f}, max abs error {o['max_abs_error']:.4g}{agree}{flat}"
            )
    return lines


def _decision_table(explanation: dict[str, Any]) -> str:
    """One row per candidate: host vs device numbers, verdict and why."""
    rows = []
    for c in explanation["candidates"]:
        m = c.get("metrics") or {}
        verdict = c["verdict"] + ("+fallback" if c.get("fallback") else "")
        rows.append(
            (
                c["label"],
                num(c["host"].get("latency_ms")),
                num(m.get("p50_ms")),
                num(m.get("p95_ms")),
                num(m.get("peak_rss_mb")),
                num(m.get("energy_mj")),
                num(m.get("accuracy_drop")),
                verdict,
                c["why"][:110],
            )
        )
    return table(
        rows,
        ["CAND", "HOST MS", "P50 MS", "P95 MS", "PEAK MB", "MJ/INF", "DROP", "VERDICT", "WHY"],
    )


def devices_outliers(
    profile: Annotated[str | None, typer.Option("--profile", help="only this profile")] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Devices measuring far off their profile peers on the same model, and what explains it."""
    rows = fleet_outliers(open_fleet(home).db, profile)
    if json_out:
        typer.echo(as_json(rows))
        return
    if not rows:
        typer.echo("no outliers: every device measures like its profile peers on its model")
        return
    typer.echo(
        table(
            [
                (
                    r["device_id"],
                    r["profile"],
                    short(r["model_sha256"]),
                    num(r["p95_ms"]),
                    num(r["peers_p95_ms"]),
                    r["peers"],
                    r["reason"] if r["explained"] else f"unexplained: {r['reason']}",
                )
                for r in rows
            ],
            ["DEVICE", "PROFILE", "MODEL", "P95 MS", "PEERS P95", "PEERS", "WHY"],
        )
    )
