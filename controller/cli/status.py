"""`edgefleet status`: the running controller's /healthz (broker, database, leader, reconcile)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.cli.common import HomeOption, JsonOption, fail
from controller.fleet.core import default_home

# How long to wait for /healthz: it answers in milliseconds unless the controller is stuck.
STATUS_TIMEOUT_S = 5.0


def _fetch(url: str) -> dict[str, Any]:
    """GET URL/healthz; its body (200 or 503), or an error naming the URL."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=STATUS_TIMEOUT_S) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            unhealthy: dict[str, Any] = json.loads(exc.read())
            return unhealthy
        raise fail(f"{url}/healthz answered HTTP {exc.code}", 1) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise fail(f"cannot reach the controller at {url}: {reason}", 1) from None


def _seconds(value: float | None) -> str:
    """12.3 -> '12 s', 4000 -> '67 min'."""
    if value is None:
        return "-"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.0f} min"


def _lines(url: str, health: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) lines of the report."""
    db = health.get("database") or {}
    lines = [
        ("controller", f"{url}: {'ok' if health.get('ok') else 'NOT OK'}"),
        (
            "database",
            f"ok ({db.get('latency_ms')} ms)" if db.get("ok") else f"error: {db.get('error')}",
        ),
    ]
    loop = health.get("controller")
    if loop is None:
        lines.append(("loop", "none in this HTTP server's process (not `up --http`)"))
        return lines
    broker = loop.get("broker") or {}
    last = loop.get("last_reconcile_age_s")
    lines += [
        (
            "broker",
            f"connected for {_seconds(broker.get('connected_for_s'))}"
            if broker.get("connected")
            else "DISCONNECTED (the controller retries with backoff; see its log)",
        ),
        ("leader", f"{'yes' if loop.get('leader') else 'no'} (replica {loop.get('replica')})"),
        ("reconcile", "never" if last is None else f"{_seconds(last)} ago"),
        ("loop", f"{'running' if loop.get('running') else 'STOPPED'}, {loop.get('errors')} errors"),
    ]
    return lines


def status(
    home: HomeOption = None,
    url: Annotated[
        str | None,
        typer.Option(help="the controller's HTTP address (default: what `up --http` recorded)"),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Health of the running controller: broker, database, leader, last reconcile (rc 1: not ok)."""
    from controller.http.server import recorded_url

    home = home or default_home()
    target = (url or recorded_url(Path(home)) or "").rstrip("/")
    if not target:
        raise fail(
            f"no controller HTTP address recorded in {home}: start `edgefleet up --http "
            "HOST:PORT`, or pass --url http://HOST:PORT"
        )
    if not target.startswith(("http://", "https://")):
        raise fail(f"--url: expected http://HOST:PORT, got {target!r}")
    health = _fetch(target)
    if json_out:
        typer.echo(json.dumps(health, indent=2))
    else:
        for label, text in _lines(target, health):
            typer.echo(f"{label:<11} {text}")
    if not health.get("ok"):
        raise typer.Exit(1)
