"""`edgefleet rollout ...`: start staged rollouts (optionally with a candidate selection phase)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.cli.common import HomeOption, JsonOption, fail, open_fleet
from controller.cli.listing import (
    LimitOption,
    ProfileFilter,
    StateFilter,
    select,
    showing,
)
from controller.cli.render import as_json, ms, num, table
from controller.cli.rollout_wait import exit_code, outcome, outcome_line, wait_for
from controller.errors import FleetError
from controller.fleet.telemetry.reports import model_label, model_names

rollout_app = typer.Typer(
    no_args_is_help=True, help="Staged rollouts: waves, gates, candidates, automatic rollback."
)
_fleet = open_fleet
_fail = fail
TimeoutOption = Annotated[
    float | None,
    typer.Option("--timeout", min=0.0, help="with --wait/--watch: give up after SECONDS (exit 4)"),
]


@rollout_app.command("start")
def rollout_start(
    model: Annotated[str, typer.Argument(help="NAME[:VERSION] (default: newest version)")],
    to: Annotated[
        str, typer.Option("--to", help="all | profile:P | device:ID | id glob; comma = union")
    ] = "all",
    waves: Annotated[
        str, typer.Option(help="cumulative waves: percentages (10,50,100) or counts (1d,10d)")
    ] = "10,50,100",
    max_failures: Annotated[
        str, typer.Option(help="abort past this: percent of executed (5%) or a count (3)")
    ] = "5%",
    min_executed: Annotated[
        int, typer.Option(help="devices that must finish before the threshold applies")
    ] = 1,
    gate: Annotated[
        list[str] | None,
        typer.Option(help="p95_ms<=X, peak_rss_mb<=Y, p95_regression<=10% (repeatable)"),
    ] = None,
    device_timeout: Annotated[str, typer.Option(help="per device and attempt: 90s, 10m")] = "10m",
    retries: Annotated[int, typer.Option(min=0, help="retries after a transport failure")] = 2,
    benchmark_runs: Annotated[int, typer.Option(min=1, help="timed runs per benchmark")] = 50,
    candidates: Annotated[
        int,
        typer.Option(help="measure the top K candidates per profile on canaries first (0 = off)"),
    ] = 0,
    canaries: Annotated[int, typer.Option(help="canary devices per profile for --candidates")] = 1,
    objective: Annotated[
        str, typer.Option(help="what the winner minimizes: latency | energy | memory | accuracy")
    ] = "latency",
    fallback: Annotated[
        bool, typer.Option(help="ship a lighter measured candidate as the on-device fallback")
    ] = False,
    fallback_window: Annotated[
        str, typer.Option(help="how long a latency breach must last before the fallback")
    ] = "60s",
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help="candidates' host accuracy drop budget, in points")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="wait until it ends; the exit code tells how (docs/cli.md)"),
    ] = False,
    timeout: TimeoutOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Roll a model out in waves; a running `edgefleet up` drives it."""
    from controller.fleet.rollout.policy import policy_from_options

    try:
        policy = policy_from_options(
            waves=waves,
            max_failures=max_failures,
            min_executed=min_executed,
            gates=gate or [],
            device_timeout=device_timeout,
            retries=retries,
            benchmark_runs=benchmark_runs,
            candidates=candidates,
            canaries=canaries,
            objective=objective,
            fallback=fallback,
            fallback_window=fallback_window,
            max_accuracy_drop=max_accuracy_drop,
        )
        fleet = _fleet(home)
        result = fleet.start_rollout(model, to, policy)
    except FleetError as exc:
        raise _fail(exc) from None
    if wait:
        _wait(lambda: fleet.deployment(result["id"]), timeout, json_out)
    if json_out:
        typer.echo(as_json(result))
        return
    selecting = (
        f"; first {candidates} candidates per profile on {canaries} canary device(s)"
        if result["phase"] == "selecting"
        else ""
    )
    typer.echo(
        f"rollout {result['id']}: {result['model']} to {len(result['devices'])} device(s) in "
        f"waves {', '.join(w['size'] for w in result['waves'])}{selecting}; a running "
        "`edgefleet up` drives it"
    )


@rollout_app.command("status")
def rollout_status(
    rollout_id: Annotated[str | None, typer.Argument(help="rollout id (default: list)")] = None,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="follow ROLLOUT_ID until it ends; exit code as --wait"),
    ] = False,
    timeout: TimeoutOption = None,
    state: StateFilter = None,
    profile: ProfileFilter = None,
    limit: LimitOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """List rollouts, or show one with its waves and each device's progress.

    With an id the exit code tells its state (docs/cli.md): 1 aborted or rolled back, 3
    completed with failed devices, 4 paused; --watch waits for the end first.
    """
    fleet = _fleet(home)
    if watch and not rollout_id:
        raise _fail("--watch needs a ROLLOUT_ID")
    try:
        result: object = fleet.deployment(rollout_id) if rollout_id else fleet.rollouts.list()
    except FleetError as exc:
        raise _fail(exc) from None
    if watch and rollout_id:
        _wait(lambda: fleet.deployment(rollout_id), timeout, json_out)
    if json_out:
        typer.echo(as_json(result))
        if isinstance(result, dict):
            raise typer.Exit(exit_code(result))
        return
    if isinstance(result, list):
        typer.echo(
            table(
                [
                    (
                        r["id"],
                        r["kind"],
                        r["model"],
                        outcome(r)["label"],
                        r["wave"],
                        _counts(r["counts"]),
                    )
                    for r in result
                ],
                ["ID", "KIND", "MODEL", "OUTCOME", "WAVE", "DEVICES"],
            )
        )
        return
    assert isinstance(result, dict)
    if profile:  # device rows of a rollout carry no profile: take it from the registry
        profiles = {d["id"]: d["profile"] for d in fleet.devices()}
        for d in result["devices"]:
            d["profile"] = profiles.get(d["device_id"])
    every = result["devices"]
    shown, matched = select(
        every,
        states=state,
        state_of=lambda d: {d["state"]},
        profiles=profile,
        limit=limit,
        json_out=False,
    )
    _print_rollout({**result, "devices": shown}, model_names(fleet.db))
    footer = showing(len(shown), matched, len(every), "devices")
    if footer:
        typer.echo(footer)
    raise typer.Exit(exit_code(result))


def _wait(read: Callable[[], dict[str, Any]], timeout: float | None, json_out: bool) -> None:
    """Follow a rollout to its end, print its outcome and exit with the code that says it."""
    try:
        final, code = wait_for(read, timeout)
    except KeyboardInterrupt:
        typer.echo("interrupted; the rollout goes on (`edgefleet rollout status ID`)", err=True)
        raise typer.Exit(130) from None
    except FleetError as exc:
        raise _fail(exc) from None
    if json_out:
        typer.echo(as_json(final))
    else:
        typer.echo(outcome_line(final))
    raise typer.Exit(code)


def _counts(counts: dict[str, int]) -> str:
    """`3 succeeded, 1 failed`."""
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "-"


def _print_rollout(r: dict[str, object], labels: dict[str, str]) -> None:
    """Human view of one rollout."""
    policy = r["policy"]
    assert isinstance(policy, dict)
    label = outcome(r)["label"]
    typer.echo(f"{r['id']}  {r['model']}  to {r['target']}  {label}  {r['reason']}".rstrip())
    typer.echo(
        f"policy: waves {', '.join(policy['waves'])}; max failures {policy['max_failures']} "
        f"after {policy['min_executed']}; gates {', '.join(policy['gates']) or 'none'}; "
        f"timeout {policy['device_timeout_s']:g} s; retries {policy['retries']}"
    )
    if r.get("phase") == "selecting" or r.get("trials"):
        _print_selection(r, labels)
    waves = r["waves"]
    devices = r["devices"]
    assert isinstance(waves, list) and isinstance(devices, list)
    typer.echo(
        table(
            [
                (w["wave"], w["size"], w["devices"], w["done"], w["succeeded"], w["failed"])
                for w in waves
            ],
            ["WAVE", "SIZE", "DEVICES", "DONE", "OK", "FAILED"],
        )
    )
    typer.echo(
        table(
            [
                (
                    d["device_id"],
                    d["wave"],
                    d["state"],
                    d["attempts"],
                    ms((d["result"] or {}).get("p95_ms")),
                    num((d["result"] or {}).get("peak_rss_mb")),
                    d["detail"] + (" [fell back]" if d.get("fell_back") else ""),
                )
                for d in devices
            ],
            ["DEVICE", "WAVE", "STATE", "RETRIES", "P95", "PEAK MB", "DETAIL"],
        )
    )


def _print_selection(r: dict[str, object], labels: dict[str, str]) -> None:
    """Trials of the selection phase and the decisions made so far."""
    trials, decisions = r.get("trials") or [], r.get("decisions") or []
    assert isinstance(trials, list) and isinstance(decisions, list)
    typer.echo(f"selection phase: {r.get('phase')}")
    typer.echo(
        table(
            [
                (
                    t["profile"],
                    t["device_id"],
                    f"#{t['rank']}",
                    t["threads"] or "-",
                    t["state"],
                    ms((t["result"] or {}).get("p95_ms")),
                    t["outlier"] or t["detail"] or "",
                )
                for t in trials
            ],
            ["PROFILE", "CANARY", "CAND", "THREADS", "TRIAL", "P95", "DETAIL"],
        )
    )
    for d in decisions:
        won = (
            f"#{d['winner_rank']} ({model_label(d['sha256'], labels)})"
            if d["winner_rank"]
            else "none"
        )
        back = f", fallback #{d['fallback_rank']}" if d["fallback_rank"] else ""
        typer.echo(f"{d['profile']}: selected {won}{back} (see `edgefleet models explain`)")


def _rollout_action(action: str, rollout_id: str, home: Path | None, json_out: bool) -> None:
    """pause | resume | abort | rollback, with the same error handling and output."""
    rollouts = _fleet(home).rollouts
    try:
        result = getattr(rollouts, action)(rollout_id)
    except FleetError as exc:
        raise _fail(exc) from None
    if json_out:
        typer.echo(as_json(result))
    else:
        typer.echo(f"rollout {rollout_id}: {result['state']}")


RolloutId = Annotated[str, typer.Argument(help="rollout id")]


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: RolloutId, home: HomeOption = None, json_out: JsonOption = False
) -> None:
    """Start no new devices or waves (devices already updating finish)."""
    _rollout_action("pause", rollout_id, home, json_out)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: RolloutId, home: HomeOption = None, json_out: JsonOption = False
) -> None:
    """Continue a paused rollout."""
    _rollout_action("resume", rollout_id, home, json_out)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: RolloutId, home: HomeOption = None, json_out: JsonOption = False
) -> None:
    """Stop a rollout and roll back every device it changed."""
    _rollout_action("abort", rollout_id, home, json_out)


@rollout_app.command("rollback")
def rollout_rollback(
    rollout_id: RolloutId, home: HomeOption = None, json_out: JsonOption = False
) -> None:
    """Return every device of a rollout (even a completed one) to its previous model."""
    _rollout_action("rollback", rollout_id, home, json_out)
