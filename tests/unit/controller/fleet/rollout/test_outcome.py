"""The rollout outcome computed once on the server: the table, the fleet's rollouts carrying it,
and the CLI's status, exit codes and progress built on it."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from controller.cli.main import app
from controller.cli.progress import ProgressDisplay
from controller.cli.rollout_wait import EXIT_PARTIAL, exit_code, wait_for
from controller.fleet.registry import Fleet
from controller.fleet.rollout.outcome import RESULTS, rollout_outcome
from controller.fleet.rollout.policy import Policy, parse_threshold, parse_waves
from controller.fleet.rollout.states import DeviceState as D
from controller.fleet.rollout.states import RolloutState as R
from controller.fleet.rollout.states import move, move_rollout
from tests.paths import TEST_DATA

runner = CliRunner()
DEVICES = ["pi-0", "pi-1", "pi-2", "pi-3"]


@pytest.mark.parametrize(
    ("state", "counts", "result", "label"),
    [
        ("running", {"pending": 3, "succeeded": 1}, "in_progress", "running"),
        ("paused", {"waiting": 4}, "paused", "paused"),
        ("completed", {"succeeded": 3, "skipped": 1}, "succeeded", "completed"),
        ("completed", {"succeeded": 2, "outlier": 1, "failed": 1}, "partial",
         "completed with 1 failed"),
        ("completed", {"succeeded": 190, "gate_failed": 6, "failed": 4}, "partial",
         "completed with 10 failed"),
        ("completed", {"failed": 2, "gate_failed": 1, "skipped": 1}, "failed",
         "completed: all 3 failed"),
        ("completed", {"outlier": 2}, "succeeded", "completed"),
        ("aborted", {"rolled_back": 3, "rollback_failed": 1}, "aborted", "aborted"),
        ("rolled_back", {"rolled_back": 4}, "rolled_back", "rolled_back"),
    ],
)  # fmt: skip
def test_outcome_table(state: str, counts: dict[str, int], result: str, label: str) -> None:
    out = rollout_outcome(state, counts)
    assert out["result"] == result and out["label"] == label
    assert result in RESULTS
    assert out["devices"] == sum(counts.values())


def test_outcome_counts_say_what_happened_to_every_device() -> None:
    out = rollout_outcome(
        "running",
        {"succeeded": 5, "outlier": 1, "failed": 2, "gate_failed": 1, "skipped": 1,
         "cancelled": 1, "superseded": 1, "pending": 3, "rolling_back": 1, "rolled_back": 2},
    )  # fmt: skip
    assert out == {
        "result": "in_progress",
        "label": "running",
        "devices": 18,
        "done": 14,  # everything but pending (3) and rolling_back (1)
        "updated": 6,  # succeeded and kept outliers
        "failed": 3,
        "skipped": 3,
        "rolled_back": 2,
    }


@pytest.fixture
def cnn_fleet(fleet: Fleet) -> Fleet:
    """Four rpi4 devices and cnn:2 registered."""
    for d in DEVICES:
        fleet.register_device(d, "rpi4")
    fleet.add_model(TEST_DATA / "tiny_int8.tflite", name="cnn", version="2", profile="rpi4")
    return fleet


@pytest.fixture
def home(cnn_fleet: Fleet, tmp_path: Path) -> Path:
    """The data dir of `cnn_fleet`, for the CLI."""
    return tmp_path / "home"


def _finish(fleet: Fleet, failed: set[str]) -> str:
    """A one-wave rollout of cnn:2 whose `failed` devices fail; completed. Its id."""
    policy = Policy(waves=parse_waves("100"), max_failures=parse_threshold("100%"))
    rid: str = fleet.start_rollout("cnn:2", "all", policy)["id"]
    with fleet.db.transaction() as tx:
        for d in DEVICES:
            end = D.FAILED if d in failed else D.SUCCEEDED
            move(tx, (rid, d), end, ts=time.time(), detail="agent error: boom")
        move_rollout(tx, rid, R.COMPLETED, ts=time.time(), reason="every wave done")
    return rid


def test_the_fleet_attaches_the_outcome_to_a_rollout_and_to_the_list(cnn_fleet: Fleet) -> None:
    rid = _finish(cnn_fleet, failed={"pi-1"})
    shown = cnn_fleet.deployment(rid)["outcome"]
    (listed,) = [r["outcome"] for r in cnn_fleet.rollouts.list() if r["id"] == rid]
    assert shown == listed
    assert shown["result"] == "partial" and shown["failed"] == 1 and shown["updated"] == 3
    assert shown["label"] == "completed with 1 failed"


def test_status_shows_the_outcome_and_a_rollout_where_all_failed_exits_3(
    cnn_fleet: Fleet, home: Path
) -> None:
    rid = _finish(cnn_fleet, failed=set(DEVICES))
    listed = runner.invoke(app, ["rollout", "status", "--home", str(home)])
    assert listed.exit_code == 0
    assert "OUTCOME" in listed.output and "completed: all 4 failed" in listed.output
    one = runner.invoke(app, ["rollout", "status", rid, "--home", str(home)])
    assert one.exit_code == EXIT_PARTIAL
    assert one.output.splitlines()[0].startswith(f"{rid}  cnn:2  to all  completed: all 4 failed")
    as_json = runner.invoke(app, ["rollout", "status", rid, "--json", "--home", str(home)])
    assert json.loads(as_json.stdout)["outcome"]["result"] == "failed"
    watched = runner.invoke(app, ["rollout", "status", rid, "--watch", "--home", str(home)])
    assert watched.exit_code == EXIT_PARTIAL
    assert "4 of 4 device(s) failed; outcome failed" in watched.stdout


def test_the_exit_code_follows_the_outcome_field() -> None:
    rollout = {"id": "r", "state": "completed", "counts": {"succeeded": 2}}
    assert exit_code(rollout) == 0
    # The API's field decides when present (a client never re-derives it).
    rollout["outcome"] = rollout_outcome("completed", {"succeeded": 1, "failed": 1})
    assert exit_code(rollout) == EXIT_PARTIAL


def _rollout(done: int, state: str = "running") -> dict[str, object]:
    """A rollout of 5 devices, `done` of them succeeded."""
    counts = {"succeeded": done, "pending": 5 - done} if done < 5 else {"succeeded": 5}
    return {"id": "ro-1", "state": state, "wave": 0, "waves": [{}], "counts": counts,
            "reason": "", "outcome": rollout_outcome(state, counts)}  # fmt: skip


def test_wait_draws_a_bar_with_devices_done_on_a_terminal() -> None:
    reads = iter([_rollout(1), _rollout(3), _rollout(5, "completed")])
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100, color_system=None)
    final, code = wait_for(
        lambda: next(reads), None, interval_s=0.01,
        display=ProgressDisplay(terminal=True, console=console),
    )  # fmt: skip
    assert code == 0 and final["state"] == "completed"
    drawn = screen.getvalue()
    assert "5/5" in drawn and "devices" in drawn and "0:00:0" in drawn  # count, elapsed
    assert "ro-1 completed" in drawn
    assert "[" not in drawn.replace("\x1b[", "")  # no plain progress lines in bar mode


def test_wait_prints_plain_lines_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    reads = iter([_rollout(1), _rollout(1), _rollout(3), _rollout(5, "completed")])
    wait_for(lambda: next(reads), None, interval_s=0.01)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "ro-1 running  wave 1/1  done 1/5",  # printed once: the second read moved nothing
        "ro-1 running  wave 1/1  done 3/5",
        "ro-1 completed  wave 1/1  done 5/5",
    ]


def test_the_list_reads_every_rollouts_counts_in_one_statement(cnn_fleet: Fleet) -> None:
    """Counts per rollout equal the per-rollout query's, and the statements run do not grow
    with the number of rollouts (the list view ran one COUNT per rollout)."""
    from sqlalchemy import event

    ids = [_finish(cnn_fleet, failed=set(DEVICES[:n])) for n in range(3)]
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    engine = cnn_fleet.db.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        listed = {r["id"]: r for r in cnn_fleet.rollouts.list()}
    finally:
        event.remove(engine, "before_cursor_execute", count)
    for rid in ids:
        assert listed[rid]["counts"] == cnn_fleet.deployment(rid)["counts"]
    assert [listed[rid]["counts"].get("failed", 0) for rid in ids] == [0, 1, 2]
    assert len(statements) == 2, statements
