"""Fleet service layer on a real SQLite file: registry, deployments, ingest, migrations."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from agent.protocol import BenchmarkReport, DeviceFacts, Event, Hello, Status
from controller.fleet.registry import Fleet, FleetError
from controller.storage.legacy import HANDED_OVER
from controller.storage.sqlite import SqliteDatabase
from controller.storage.upgrade import head
from tests.paths import TEST_DATA

DATA = TEST_DATA
FACTS = DeviceFacts("aarch64", "Linux", 4, 3792, "tflite-runtime", "2.14.0", "3.11.2")


def test_database_is_wal_and_migrated(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "x.db")
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == HANDED_OVER
    assert db.schema_version() == head()
    db.close()
    again = SqliteDatabase(tmp_path / "x.db")  # re-opening applies nothing twice
    assert again.migrate() == head()


def test_register_validates_id_and_profile(fleet: Fleet) -> None:
    with pytest.raises(FleetError, match="Invalid device id"):
        fleet.register_device("bad/id", "rpi4")
    with pytest.raises(FleetError, match="no-such-board"):
        fleet.register_device("d1", "no-such-board")
    row = fleet.register_device("d1", "rpi4")
    assert row["profile"] == "rpi4" and row["registered_by"] == "cli"


def test_unknown_device_is_a_clear_error(fleet: Fleet) -> None:
    with pytest.raises(FleetError, match="unknown device 'ghost'"):
        fleet.device("ghost")
    with pytest.raises(FleetError, match="unknown device"):
        fleet.remove_device("ghost")


def test_hello_registers_and_matches_profile(fleet: Fleet) -> None:
    fleet.record_hello(Hello(device_id="d2", agent_version="0.1.0", facts=FACTS))
    row = fleet.device("d2")
    assert row["online"] and row["runtime_version"] == "2.14.0"
    assert row["profile"] == "rpi4", row["profile_reason"]
    assert row["facts"]["cpu_count"] == 4


def test_operator_profile_wins_over_declared(fleet: Fleet) -> None:
    fleet.register_device("d3", "rpi5")
    fleet.record_hello(Hello(device_id="d3", agent_version="0.1.0", facts=FACTS, profile="rpi4"))
    assert fleet.device("d3")["profile"] == "rpi5"


def test_deploy_sets_desired_generation_and_supersedes(fleet: Fleet) -> None:
    fleet.register_device("d1", "rpi4")
    first = fleet.deploy(DATA / "tiny_fp32.tflite", devices=["d1"])
    second = fleet.deploy(DATA / "tiny_int8.tflite", devices=["d1"])
    gen1 = fleet.deployment(first["id"])["devices"][0]["generation"]
    gen2 = fleet.device("d1")["desired_generation"]
    assert gen2 > gen1 > 0
    assert fleet.deployment(first["id"])["devices"][0]["state"] == "superseded"
    pending = fleet.unpublished_desired()
    assert [(d, desired.generation) for d, desired, _ in pending] == [("d1", gen2)]
    assert pending[0][1].deployment_id == second["id"]
    fleet.mark_published("d1", gen2)
    assert fleet.unpublished_desired() == []
    fleet.republish_all()
    assert len(fleet.unpublished_desired()) == 1


def test_generation_never_goes_back_after_remove_or_a_new_database(tmp_path: Path) -> None:
    """The agent ignores generations <= the last applied one; a reset would lose deployments."""
    old = Fleet(tmp_path / "old")
    old.register_device("d1", "rpi4")
    old.deploy(DATA / "tiny_fp32.tflite", devices=["d1"])
    old.deploy(DATA / "tiny_int8.tflite", devices=["d1"])
    applied = old.device("d1")["desired_generation"]
    old.remove_device("d1")
    old.register_device("d1", "rpi4")
    old.deploy(DATA / "tiny_fp32.tflite", devices=["d1"])
    assert old.device("d1")["desired_generation"] > applied
    new = Fleet(tmp_path / "new")
    new.register_device("d1", "rpi4")
    new.deploy(DATA / "tiny_fp32.tflite", devices=["d1"])
    assert new.device("d1")["desired_generation"] > applied


def test_oversized_artifact_is_refused_before_it_can_poison_the_reconcile_loop(
    fleet: Fleet, tmp_path: Path
) -> None:
    big = tmp_path / "big.tflite"
    with big.open("wb") as fh:
        fh.write((DATA / "tiny_fp32.tflite").read_bytes())
        fh.truncate(300 * 1024 * 1024)  # sparse: 300 MiB -> manifest over the message cap
    fleet.register_device("d1", "rpi4")
    with pytest.raises(FleetError, match="too large to distribute"):
        fleet.deploy(big, devices=["d1"])
    assert fleet.unpublished_desired() == []


def test_deploy_by_profile_and_bad_targets(fleet: Fleet) -> None:
    fleet.register_device("a", "rpi4")
    fleet.register_device("b", "rpi5")
    dep = fleet.deploy(DATA / "tiny_fp32.tflite", profile="rpi4")
    assert [d["device_id"] for d in dep["devices"]] == ["a"]
    with pytest.raises(FleetError, match="choose the target"):
        fleet.deploy(DATA / "tiny_fp32.tflite")
    with pytest.raises(FleetError, match="no registered device has profile 'pixel-8'"):
        fleet.deploy(DATA / "tiny_fp32.tflite", profile="pixel-8")
    with pytest.raises(FleetError, match="no such file"):
        fleet.deploy(DATA / "missing.tflite", devices=["a"])
    with pytest.raises(FleetError, match="not a TFLite model"):
        fleet.deploy(DATA / "garbage.tflite", devices=["a"])
    with pytest.raises(FleetError, match="empty file"):
        fleet.deploy(DATA / "empty.tflite", devices=["a"], check=False)


def test_events_are_stored_once_and_drive_deployment_state(fleet: Fleet) -> None:
    fleet.register_device("d1", "rpi4")
    dep = fleet.deploy(DATA / "tiny_fp32.tflite", devices=["d1"])
    sha = dep["devices"][0]["artifact_sha256"]
    generation = dep["devices"][0]["generation"]
    report = BenchmarkReport(
        sha,
        "litert",
        "2.3.0",
        1,
        50,
        5,
        2.0,
        0.5,
        0.1,
        0.2,
        0.25,
        0.3,
        0.12,
        0.01,
        0.09,
        0.4,
        50.0,
        48.0,
        3.0,
        0.3,
        "estimated",
        True,
    )
    event = Event(
        device_id="d1",
        event_id="e1",
        kind="benchmark",
        message="done",
        deployment_id=dep["id"],
        generation=generation,
        state="active",
        model_sha256=sha,
        benchmark=report,
    )
    assert fleet.record_event(event) is True
    assert fleet.record_event(event) is False, "a redelivered event is stored once"
    assert fleet.deployment(dep["id"])["devices"][0]["state"] == "succeeded"
    assert len(fleet.benchmarks("d1")) == 1


def test_offline_status_only_flips_online(fleet: Fleet) -> None:
    fleet.record_hello(Hello(device_id="d1", agent_version="0.1.0", facts=FACTS))
    sha = "cd" * 32
    fleet.record_status(Status(device_id="d1", online=True, state="active", model_sha256=sha))
    fleet.record_status(Status(device_id="d1", online=False, state="idle"))
    row = fleet.device("d1")
    assert not row["online"] and row["model_sha256"] == sha and row["state"] == "active"


def test_wal_allows_a_reader_while_a_writer_holds_a_transaction(tmp_path: Path) -> None:
    writer = Fleet(tmp_path / "h")
    reader = Fleet(tmp_path / "h")
    writer.register_device("d1", "rpi4")
    with writer.db.transaction() as tx:
        tx.execute("UPDATE devices SET state = 'busy' WHERE id = 'd1'")
        started = time.monotonic()
        assert reader.device("d1")["state"] == "unknown"
        assert time.monotonic() - started < 1.0
    assert reader.device("d1")["state"] == "busy"


def test_failed_transaction_rolls_back(fleet: Fleet) -> None:
    if fleet.db.dialect == "sqlite":
        duplicate_key: type[Exception] = sqlite3.IntegrityError
    else:
        import psycopg

        duplicate_key = psycopg.errors.UniqueViolation
    with pytest.raises(duplicate_key), fleet.db.transaction() as tx:
        tx.execute("INSERT INTO devices (id, registered_by, registered_at) VALUES ('x', 'cli', 1)")
        tx.execute("INSERT INTO devices (id, registered_by, registered_at) VALUES ('x', 'cli', 1)")
    assert fleet.devices() == []


def test_unanswered_commands_are_sent_again_when_the_device_says_hello(fleet: Fleet) -> None:
    fleet.register_device("d1", "rpi4")
    command_id = fleet.send_command("d1", "benchmark")
    fleet.mark_command_published(command_id)
    assert fleet.unpublished_commands() == []
    fleet.record_hello(Hello(device_id="d1", agent_version="0.1.0", facts=FACTS))
    assert [c.command_id for _, c in fleet.unpublished_commands()] == [command_id]
    fleet.mark_command_published(command_id)
    fleet.record_event(
        Event(device_id="d1", event_id=command_id, kind="command", message="benchmark done")
    )
    fleet.record_hello(Hello(device_id="d1", agent_version="0.1.0", facts=FACTS))
    assert fleet.unpublished_commands() == [], "an answered command is not sent again"


def test_nested_transaction_is_a_savepoint(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "x.db")
    db.conn.execute("CREATE TABLE t (v INTEGER)")
    with db.transaction() as tx:
        tx.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(ZeroDivisionError), db.transaction() as inner:
            inner.execute("INSERT INTO t VALUES (2)")
            _ = 1 / 0
        with db.transaction() as inner:
            inner.execute("INSERT INTO t VALUES (3)")
    assert [r[0] for r in db.conn.execute("SELECT v FROM t ORDER BY v")] == [1, 3]
    assert not db.conn.in_transaction


@pytest.mark.parametrize(
    ("name", "version", "message"),
    [
        ("../../etc/cnn", "1", "Invalid model name: '../../etc/cnn' contains '..'"),
        ("models/cnn", "1", "contains path separator '/'"),
        ("cnn", "1\n2", "Invalid model version"),
        ("cnn\x1b[31m", "1", "Invalid model name"),
    ],
)
def test_model_names_that_could_escape_are_refused_before_anything_is_stored(
    fleet: Fleet, name: str, version: str, message: str
) -> None:
    with pytest.raises(FleetError, match=message.replace("[", r"\[")):
        fleet.add_model(DATA / "tiny_fp32.tflite", name=name, version=version)
    assert fleet.models() == []
    assert not list((fleet.home / "artifacts").rglob("*.tflite"))
