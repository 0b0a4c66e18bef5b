"""Persisted agent state: the update record, remembered command ids, and the failpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.commands import SeenCommands
from agent.failpoint import ENV_VAR, EXIT_CODE, FailpointHook, parse_failpoint
from agent.protocol import AgentState
from agent.update.record import UpdateRecord, UpdateStateFile
from agent.update.table import UpdateEvent

pytestmark = pytest.mark.agent

STATES = frozenset(s.value for s in AgentState)


def test_record_round_trips_the_reporting_flags(tmp_path: Path) -> None:
    state = UpdateStateFile(tmp_path / "update.json")
    state.fire(UpdateEvent.SERVING, generation=3, applied_generation=3, stage=None, reported=True)
    again = UpdateStateFile(tmp_path / "update.json")
    assert again.record.reported and not again.record.benchmarked
    assert again.problem is None


def test_record_written_by_an_older_agent_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "update.json"
    path.write_text(json.dumps({"state": "active", "generation": 2, "applied_generation": 2}))
    record = UpdateStateFile(path).record
    assert record == UpdateRecord(state="active", generation=2, applied_generation=2)


def test_unknown_fields_are_ignored_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "update.json"
    path.write_text(json.dumps({"state": "idle", "from_the_future": 1}))
    state = UpdateStateFile(path)
    assert state.problem is None and state.record.state == "idle"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"state": "fetch', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "$: expected an object, got list"),
        (b'{"state": "exploded"}', "$.state: must be one of ['idle', 'fetching'"),
        (b'{"state": "idle", "generation": "7"}', "$.generation: expected an integer, got '7'"),
        (b'{"state": "idle", "reported": 1}', "$.reported: expected a boolean, got 1"),
        (b'{"state": "idle", "generation": true}', "$.generation: expected an integer, got True"),
        (b'{"state": "idle", "generation": -1}', "counter out of range"),
        (b'{"state": "idle", "stores": -1}', "counter out of range"),
    ],
)
def test_corrupt_record_is_quarantined_and_starts_afresh(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "update.json"
    path.write_bytes(content)
    state = UpdateStateFile(path)
    assert state.record == UpdateRecord()
    assert state.problem is not None and why in state.problem
    assert (tmp_path / "update.json.corrupt").read_bytes() == content
    assert not path.exists()
    state.fire(UpdateEvent.DOWNLOAD)  # and it keeps working
    assert UpdateStateFile(path).record.state == "fetching"


def test_seen_commands_survive_a_restart_and_stay_bounded(tmp_path: Path) -> None:
    path = tmp_path / "commands.json"
    seen = SeenCommands(path, limit=3)
    assert seen.add("a") and not seen.add("a")
    for cid in ("b", "c", "d"):
        assert seen.add(cid)
    again = SeenCommands(path, limit=3)
    assert "a" not in again, "the oldest id fell off"
    assert all(c in again for c in ("b", "c", "d"))
    assert not again.add("d")
    assert json.loads(path.read_text()) == {"seen": ["b", "c", "d"]}


@pytest.mark.parametrize("content", [b"{nope", b'{"seen": "abc"}', b'{"seen": [1, 2]}', b"7"])
def test_corrupt_seen_commands_are_quarantined(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "commands.json"
    path.write_bytes(content)
    seen = SeenCommands(path)
    assert seen.problem is not None and "remembered command ids are lost" in seen.problem
    assert (tmp_path / "commands.json.corrupt").read_bytes() == content
    assert seen.add("x") and "x" in SeenCommands(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("pause-after:fetching", ("pause-after", "fetching", 60.0)),
        ("pause-after:self-testing:2.5", ("pause-after", "self-testing", 2.5)),
        ("exit-after:active", ("exit-after", "active", 60.0)),
    ],
)
def test_failpoint_parses(text: str, expected: tuple[str, str, float] | None) -> None:
    point = parse_failpoint(text, STATES)
    got = None if point is None else (point.action, point.state, point.seconds)
    assert got == expected


@pytest.mark.parametrize(
    "text", ["pause-after", "pause-after:nowhere", "crash-after:active", "pause-after:idle:x"]
)
def test_failpoint_rejects_bad_values_loudly(text: str) -> None:
    with pytest.raises(ValueError, match="EDGEFLEET_FAILPOINT"):
        parse_failpoint(text, STATES)


def test_failpoint_pauses_once_after_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "pause-after:staged:0.2")
    hook = FailpointHook(STATES)
    started = time.monotonic()
    hook.after_persist("fetching")
    assert time.monotonic() - started < 0.1, "other states pass straight through"
    hook.after_persist("staged")
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    hook.after_persist("staged")
    assert time.monotonic() - started < 0.1, "it fires once per process"


def test_failpoint_is_inert_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert FailpointHook(STATES).point is None


def test_exit_after_ends_the_process_right_after_the_write(tmp_path: Path) -> None:
    script = (
        "from pathlib import Path; from agent.update.record import UpdateStateFile; "
        "from agent.update.table import UpdateEvent as E; "
        f"s = UpdateStateFile(Path({str(tmp_path / 'update.json')!r})); "
        "s.fire(E.DOWNLOAD); s.fire(E.FETCHED); print('not reached')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, ENV_VAR: "exit-after:fetching"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == EXIT_CODE, proc.stderr
    assert "not reached" not in proc.stdout
    assert UpdateStateFile(tmp_path / "update.json").record.state == "fetching"


def test_agent_refuses_to_start_with_a_bad_failpoint(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "d1"\ndata_dir = "{tmp_path / "data"}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        env={**os.environ, ENV_VAR: "pause-after:lunch"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "EDGEFLEET_FAILPOINT='pause-after:lunch'" in proc.stderr
