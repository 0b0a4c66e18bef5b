"""Agent daemon logic without a network: restore, exactly-once results, corrupt files, commands.

An in-memory broker stands in for MQTT (retained messages, subscriptions, a controller that
answers `need` with chunks), so the update flow runs for real, child-process self-test included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.daemon import Agent, ReportOutcome, derived_event_id
from agent.protocol import Command
from agent.store import ModelStore
from agent.update.record import UpdateStateFile
from agent.update.restore import MAX_SELFTEST_ATTEMPTS
from agent.update.table import MAX_STATE_STORES, UpdateEvent
from tests.memory_agent import NEW, OLD, MemoryBroker, apply_desired, make_desired

pytestmark = pytest.mark.agent


def test_update_sends_deterministic_event_ids_and_one_result(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]],
) -> None:
    agent, broker = make_agent()
    manifest = broker.offer(OLD.read_bytes(), chunk_size=2048)
    apply_desired(agent, make_desired(7, manifest))
    ids = [e["event_id"] for e in broker.events(generation=7)]
    assert ids == [
        "g7-fetching",
        "g7-verifying",
        "g7-staged",
        "g7-self-testing",
        "g7-active",
        "g7-benchmark",
    ]
    active = broker.events(event_id="g7-active")[0]
    assert "no golden inputs shipped: seeded random inputs" in active["message"]
    assert agent.state.record.reported and agent.state.record.benchmarked
    # A restart (new process over the same data dir) re-sends nothing: both were acknowledged.
    again, broker2 = make_agent()
    again.reporter.report_outcome()
    assert not broker2.events()


def test_unacknowledged_result_is_resent_with_the_same_ids_after_a_restart(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]],
) -> None:
    agent, broker = make_agent()
    broker.ack = False  # broker gone before the PUBACK
    manifest = broker.offer(OLD.read_bytes())
    apply_desired(agent, make_desired(8, manifest))
    assert [e["event_id"] for e in broker.events(kind="update", state="active")] == ["g8-active"]
    assert not broker.events(kind="benchmark"), "no benchmark until the activation is acknowledged"
    assert not agent.state.record.reported

    restarted, broker2 = make_agent()  # the connect queues ReportOutcome
    restarted.reporter.report_outcome()
    assert [e["event_id"] for e in broker2.events()] == ["g8-active", "g8-benchmark"]
    assert broker2.events(kind="benchmark")[0]["benchmark"]["runs"] == 3, "desired's runs kept"
    assert restarted.state.record.reported and restarted.state.record.benchmarked


def test_kill_between_active_and_report_then_stale_redelivery_still_reports(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]], tmp_path: Path
) -> None:
    agent, broker = make_agent()
    manifest = broker.offer(OLD.read_bytes())
    apply_desired(agent, make_desired(9, manifest))
    # Rewind the bookkeeping to "active persisted, nothing reported" (a SIGKILL at that point).
    state = UpdateStateFile(tmp_path / "agent" / "update.json")
    state.update(reported=False, benchmarked=False)
    restarted, broker2 = make_agent()
    # The retained desired again: stale, ignored.
    apply_desired(restarted, make_desired(9, manifest))
    restarted.reporter.report_outcome()
    assert [e["event_id"] for e in broker2.events()] == ["g9-active", "g9-benchmark"]
    assert not broker2.events(kind="update", state="fetching"), "nothing was downloaded again"


def test_failure_reports_its_stage_once(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]],
) -> None:
    agent, broker = make_agent()
    manifest = broker.offer(OLD.read_bytes())
    apply_desired(agent, make_desired(3, manifest, latency_budget_ms=0.00001))
    errors = broker.events(kind="error")
    assert [(e["event_id"], e["stage"]) for e in errors] == [("g3-failed", "self-testing")]
    assert "over budget" in errors[0]["message"]
    restarted, broker2 = make_agent()
    restarted.reporter.report_outcome()
    assert not broker2.events(), "acknowledged failures are not re-sent"


def test_crash_loop_guard_fails_with_stage_self_testing(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]], tmp_path: Path
) -> None:
    state = UpdateStateFile(tmp_path / "agent" / "update.json")
    for event in (UpdateEvent.DOWNLOAD, UpdateEvent.FETCHED, UpdateEvent.VERIFIED):
        state.fire(event, deployment_id="dep-9", generation=4, sha256="ab" * 32)
    state.fire(UpdateEvent.SELFTEST)
    state.update(selftest_attempts=MAX_SELFTEST_ATTEMPTS)
    agent, broker = make_agent()
    agent.reporter.report_outcome()
    error = broker.events(kind="error")[0]
    assert error["event_id"] == "g4-failed" and error["stage"] == "self-testing"
    assert "crashed the agent 3 times" in error["message"]


def test_restart_loop_in_any_in_flight_state_is_failed_by_the_loop_guard(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]], tmp_path: Path
) -> None:
    state = UpdateStateFile(tmp_path / "agent" / "update.json")
    state.fire(UpdateEvent.DOWNLOAD, deployment_id="dep-9", generation=6, sha256="ab" * 32)
    state.fire(UpdateEvent.FETCHED)
    state.update(stores=MAX_STATE_STORES)  # restarted in `verifying` again and again
    agent, broker = make_agent()
    assert agent.state.record.state == "failed" and agent.state.record.stage == "verifying"
    agent.reporter.report_outcome()
    (error,) = broker.events(kind="error", generation=6)
    assert error["event_id"] == "g6-failed" and error["stage"] == "verifying"
    assert error["message"].startswith("state loop detected: 31 persisted states")


def test_chunks_are_written_by_the_work_thread_not_the_network_thread(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]],
) -> None:
    agent, broker = make_agent()
    manifest = broker.offer(OLD.read_bytes(), chunk_size=1024)
    agent.fetcher._accepting = manifest.sha256  # as during a fetch
    started = time.perf_counter()
    agent.router.on_message(
        broker.topics.chunk(manifest.sha256, 0), broker.blobs[manifest.sha256][1][:1024]
    )
    assert time.perf_counter() - started < 0.5
    assert not agent.config.downloads_dir.exists() or not any(agent.config.downloads_dir.iterdir())
    assert agent.fetcher._chunks.qsize() == 1
    agent.router.on_message(broker.topics.chunk(manifest.sha256, 1), b"")  # a cleared chunk
    assert agent.fetcher._chunks.qsize() == 1, "empty payloads are not chunks"


def test_a_new_download_removes_partials_of_superseded_artifacts(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]],
) -> None:
    agent, broker = make_agent()
    downloads = agent.config.downloads_dir
    downloads.mkdir(parents=True)
    stale = "cd" * 32
    (downloads / f"{stale}.part").write_bytes(b"x" * 10)
    (downloads / f"{stale}.chunks.json").write_text("{}")
    manifest = broker.offer(OLD.read_bytes())
    apply_desired(agent, make_desired(2, manifest))
    assert not list(downloads.iterdir()), "stale partials and the finished one are gone"


def test_corrupt_update_json_is_quarantined_reported_and_rebuilt(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]], tmp_path: Path
) -> None:
    agent, broker = make_agent()
    manifest = broker.offer(OLD.read_bytes())
    apply_desired(agent, make_desired(2, manifest))
    path = tmp_path / "agent" / "update.json"
    path.write_text('{"state": 12}')
    restarted, broker2 = make_agent()
    assert path.with_name("update.json.corrupt").read_text() == '{"state": 12}'
    assert restarted.serving.sha256 == manifest.sha256
    assert restarted.state.record.state == "active"
    assert "rebuilt" in restarted.state.record.detail
    error = broker2.events(kind="error")[0]
    assert "update.json" in error["message"] and "$.state: must be one of" in error["message"]
    # The retained desired state is applied again: already served, so activated at once.
    apply_desired(restarted, make_desired(2, manifest))
    assert [e["event_id"] for e in broker2.events(generation=2)] == ["g2-active", "g2-benchmark"]


def test_corrupt_pointers_rebuilt_from_the_recorded_active_model(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]], tmp_path: Path
) -> None:
    agent, broker = make_agent()
    old, new = broker.offer(OLD.read_bytes()), broker.offer(NEW.read_bytes())
    apply_desired(agent, make_desired(1, old))
    apply_desired(agent, make_desired(2, new))
    pointers = tmp_path / "agent" / "models" / "pointers.json"
    pointers.write_bytes(b"\x00\xff garbage")
    restarted, broker2 = make_agent()
    assert restarted.serving.sha256 == new.sha256
    assert ModelStore(pointers.parent).pointers().previous == old.sha256
    assert "recorded active model" in broker2.events(kind="error")[0]["message"]


def test_committed_model_that_no_longer_loads_is_reported_failed(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]], tmp_path: Path
) -> None:
    agent, broker = make_agent()
    old, new = broker.offer(OLD.read_bytes()), broker.offer(NEW.read_bytes())
    apply_desired(agent, make_desired(1, old))
    broker.ack = False  # the activation of generation 2 never reaches the controller
    apply_desired(agent, make_desired(2, new))
    model = tmp_path / "agent" / "models" / f"{new.sha256}.tflite"
    model.write_bytes(model.read_bytes()[:100])  # and then the file rots
    restarted, broker2 = make_agent()
    assert restarted.serving.sha256 == old.sha256
    restarted.reporter.report_outcome()
    error = broker2.events(kind="error", generation=2)[0]
    assert error["event_id"] == "g2-failed" and error["stage"] == "active"
    assert "no longer loads" in error["message"]
    assert not broker2.events(kind="update", state="active")


def test_commands_have_one_effect_across_restarts(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]],
) -> None:
    agent, broker = make_agent()
    manifest = broker.offer(OLD.read_bytes())
    apply_desired(agent, make_desired(1, manifest))
    command = Command(command_id="c-1", action="benchmark", runs=2, warmup=0)
    agent.commands.run(command)
    agent.commands.run(command)
    restarted, broker2 = make_agent()
    restarted.commands.run(command)
    assert len(broker.events(event_id="c-1")) == 1
    assert len(broker.events(event_id="c-1-bench")) == 1
    assert not broker2.events(event_id="c-1")


def test_derived_event_ids_fit_the_protocol() -> None:
    assert derived_event_id("cmd-1", "bench") == "cmd-1-bench"
    long = derived_event_id("x" * 64, "bench")
    assert len(long) <= 64 and long.endswith("-bench")
    assert long == derived_event_id("x" * 64, "bench"), "stable"


def test_report_outcome_is_a_work_item_queued_on_connect(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]],
) -> None:
    agent, _ = make_agent()
    agent.router.on_connect(agent.session)
    items = [agent.inbox.queue.get_nowait() for _ in range(agent.inbox.queue.qsize())]
    assert any(isinstance(i, ReportOutcome) for i in items)
