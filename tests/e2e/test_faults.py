"""Fault tests of the agent update flow: kills in every state, broker loss, cut links, bad data.

Every test proves an outcome (which model serves, which result the controller recorded, what
was fetched again), not merely that nothing crashed. Real agent processes (killed by PID),
real mosquitto (killed by PID), the real controller service or, where a test must misbehave
like no controller would, a scripted controller on raw paho.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.failpoint import ENV_VAR as FAILPOINT_ENV
from agent.protocol import (
    ArtifactRef,
    Command,
    Desired,
    GoldenRef,
    Manifest,
    Need,
    Topics,
    dump,
    parse,
)
from controller.brokers.base import BrokerHandle
from controller.brokers.mosquitto import start_mosquitto
from tests.e2e.brokers import mosquitto_only  # noqa: F401  (is e2e_broker)
from tests.e2e.conftest import DATA, AgentProcess, RunningController, wait_until
from tests.e2e.proxy import TcpProxy
from tests.mqtt_helpers import MqttProbe, ReceivedMessage

pytestmark = [pytest.mark.e2e, pytest.mark.agent]
# e2e_broker is mosquitto only: tests kill it by PID and restart it on its port, some persistent.

OLD, NEW = DATA / "tiny_fp32.tflite", DATA / "tiny_int8.tflite"
NEW_GOLDEN = DATA / "tiny_int8.golden.npz"
# Deployments include a cold interpreter import in the self-test child: allow for a slow runner.
DEPLOY_TIMEOUT_S = 90
# Pause long enough that the test surely kills the agent inside it.
PAUSE_S = 300


def _sha(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# =========================================================================== fixtures


@pytest.fixture
def start_fast_agent(
    start_agent: Callable[..., AgentProcess],
) -> Callable[..., AgentProcess]:
    """conftest's start_agent with a 0.5 s repair interval and no trusted keys (development mode,
    so a scripted controller's unsigned messages pass) unless a test passes them."""

    def start(device_id: str, **overrides: Any) -> AgentProcess:
        return start_agent(device_id, **{"repair_interval_s": 0.5, "trusted_keys": (), **overrides})

    return start


# =========================================================================== controller helpers


def _online(ctl: RunningController, device_id: str) -> bool:
    """True once the device said hello and is online."""
    return any(d["id"] == device_id and d["online"] and d["facts"] for d in ctl.fleet.devices())


def _finished(ctl: RunningController, deployment_id: str) -> dict[str, Any] | None:
    """The deployment's single device row (with its deployment id) once it is terminal."""
    row = ctl.fleet.deployment(deployment_id)["devices"][0]
    done = row["state"] in ("succeeded", "failed")
    return {**row, "deployment_id": deployment_id} if done else None


def _deploy(ctl: RunningController, model: Path, device_id: str, **kw: Any) -> dict[str, Any]:
    """Deploy to one device and wait for its terminal row."""
    dep = ctl.fleet.deploy(model, devices=[device_id], **kw)
    return wait_until(lambda: _finished(ctl, dep["id"]), DEPLOY_TIMEOUT_S, f"deployment of {model}")


def _results(ctl: RunningController, device_id: str, deployment_id: str) -> dict[int, Any]:
    """Stored events of a deployment per generation: activations, errors and benchmarks.

    A failed deployment may be followed by an automatic rollback under a newer generation of
    the same deployment; each generation is judged on its own.
    """
    rows = ctl.fleet.db.query(
        "SELECT event_id, kind, generation, state, message FROM events "
        "WHERE device_id = ? AND deployment_id = ? ORDER BY generation",
        (device_id, deployment_id),
    )
    out: dict[int, dict[str, list[Any]]] = {}
    for r in rows:
        sorted_ = out.setdefault(r["generation"], {"activated": [], "errors": [], "benchmarks": []})
        if r["kind"] == "update" and r["state"] == "active":
            sorted_["activated"].append(r)
        elif r["kind"] in ("error", "benchmark"):
            sorted_["errors" if r["kind"] == "error" else "benchmarks"].append(r)
    return out


def _benchmark_works(ctl: RunningController, device_id: str) -> dict[str, Any]:
    """Ask for a benchmark now; return its stored report (proves the serving model runs)."""
    command_id = ctl.fleet.send_command(device_id, "benchmark", runs=5, warmup=1)
    wait_until(lambda: ctl.fleet.command(command_id)["completed"], 60, f"command {command_id}")
    rows = ctl.fleet.db.query(
        "SELECT model_sha256, p50_ms FROM benchmarks WHERE device_id = ? AND event_id = ?",
        (device_id, f"{command_id}-bench"),
    )
    assert len(rows) == 1, rows
    return rows[0]


def _assert_one_terminal_result(
    ctl: RunningController, device_id: str, row: dict[str, Any], log: str
) -> dict[str, list[Any]]:
    """Every generation of the deployment got exactly one activation (with one benchmark) or
    exactly one error; returns the results of the deployment's first generation."""
    per_generation = _results(ctl, device_id, row["deployment_id"])
    assert per_generation, f"no events for {row['deployment_id']}: {log[-3000:]}"
    for generation, results in per_generation.items():
        activated, errors = results["activated"], results["errors"]
        assert len(activated) + len(errors) == 1, (generation, results, log[-4000:])
        if activated:
            assert len(results["benchmarks"]) == 1, (generation, results)
    first = per_generation[min(per_generation)]
    if row["state"] == "succeeded":
        assert len(per_generation) == 1 and first["activated"], per_generation
    else:
        assert first["errors"], per_generation
    return first


# =========================================================================== kill in every state

KILL_STATES = ["fetching", "verifying", "staged", "self-testing", "active"]


@pytest.mark.parametrize("state", KILL_STATES)
def test_sigkill_in_every_update_state_yields_one_result(
    state: str, controller: RunningController, start_fast_agent: Callable[..., AgentProcess]
) -> None:
    """Power loss right after each persisted state: one model serves and one result is sent."""
    agent = start_fast_agent("dev-kill")
    wait_until(lambda: _online(controller, "dev-kill"), 30, "hello")
    assert _deploy(controller, OLD, "dev-kill")["state"] == "succeeded", agent.log()[-3000:]

    agent.terminate()
    agent.env = {FAILPOINT_ENV: f"pause-after:{state}:{PAUSE_S}"}
    agent.start()
    dep = controller.fleet.deploy(NEW, devices=["dev-kill"], golden=NEW_GOLDEN)
    marker = f"failpoint: paused after persisting '{state}'"
    wait_until(lambda: marker in agent.log(), 60, marker)
    agent.kill()
    agent.env = {}
    agent.start()

    row = wait_until(lambda: _finished(controller, dep["id"]), DEPLOY_TIMEOUT_S, "terminal row")
    _assert_one_terminal_result(controller, "dev-kill", row, agent.log())
    device = wait_until(
        lambda: (d := controller.fleet.device("dev-kill"))["online"] and d, 30, "status"
    )
    assert device["model_sha256"] in (_sha(OLD), _sha(NEW))
    assert row["state"] == "succeeded", f"resumable in {state}: {row}"
    assert device["model_sha256"] == _sha(NEW)
    assert _benchmark_works(controller, "dev-kill")["model_sha256"] == device["model_sha256"]
    assert agent.alive


def test_exit_after_active_before_any_report_still_reports_once(
    controller: RunningController, start_fast_agent: Callable[..., AgentProcess]
) -> None:
    """os._exit right after `active` hit the disk: the restart sends activation + benchmark."""
    agent = start_fast_agent("dev-exit", env={FAILPOINT_ENV: "exit-after:active"})
    wait_until(lambda: _online(controller, "dev-exit"), 30, "hello")
    dep = controller.fleet.deploy(OLD, devices=["dev-exit"])
    assert agent.proc is not None
    assert agent.proc.wait(DEPLOY_TIMEOUT_S) == 70, agent.log()[-3000:]
    assert _finished(controller, dep["id"]) is None, "nothing was reported before the exit"
    agent.env = {}
    agent.start()
    row = wait_until(lambda: _finished(controller, dep["id"]), DEPLOY_TIMEOUT_S, "terminal row")
    _assert_one_terminal_result(controller, "dev-exit", row, agent.log())
    assert row["state"] == "succeeded"


# =========================================================================== golden self-test


def test_golden_self_test_commits_good_models_and_refuses_nan_and_foreign_goldens(
    controller: RunningController, start_fast_agent: Callable[..., AgentProcess]
) -> None:
    """Golden inputs decide the commit; a refused model never replaces the serving one."""
    agent = start_fast_agent("dev-gold")
    wait_until(lambda: _online(controller, "dev-gold"), 30, "hello")
    good = _deploy(controller, NEW, "dev-gold", golden=NEW_GOLDEN)
    assert good["state"] == "succeeded", agent.log()[-3000:]
    activated = _assert_one_terminal_result(controller, "dev-gold", good, "")["activated"]
    assert "golden: 4 samples" in activated[0]["message"], activated
    golden_file = agent.config.models_dir / f"{_sha(NEW)}.golden.npz"
    assert golden_file.read_bytes() == NEW_GOLDEN.read_bytes()

    nan = _deploy(
        controller, DATA / "tiny_nan.tflite", "dev-gold", golden=DATA / "tiny_nan.golden.npz"
    )
    assert nan["state"] == "failed" and nan["stage"] == "self-testing", nan
    assert "not finite (NaN or Inf) on golden sample 0" in nan["detail"], nan
    _assert_one_terminal_result(controller, "dev-gold", nan, agent.log())

    foreign = _deploy(controller, OLD, "dev-gold", golden=NEW_GOLDEN, name="old-foreign")
    assert foreign["state"] == "failed" and foreign["stage"] == "self-testing", foreign
    assert "golden was made for another model" in foreign["detail"], foreign

    device = controller.fleet.device("dev-gold")
    assert device["model_sha256"] == _sha(NEW), "the committed model keeps serving"
    assert _benchmark_works(controller, "dev-gold")["model_sha256"] == _sha(NEW)
    assert golden_file.exists(), "the active model keeps its golden"
    assert not (agent.config.models_dir / f"{_sha(OLD)}.golden.npz").exists()


# =========================================================================== broker loss


@pytest.mark.parametrize(
    ("e2e_broker", "sig"),
    [(False, signal.SIGKILL), (True, signal.SIGKILL), (True, signal.SIGTERM)],
    indirect=["e2e_broker"],
    ids=["no-persistence-kill", "persistence-kill", "persistence-term"],
)
def test_broker_dies_mid_transfer_and_comes_back_on_its_port(
    e2e_broker: BrokerHandle,
    sig: signal.Signals,
    controller: RunningController,
    start_fast_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    """The deployment completes after the broker is killed mid-download and restarted."""
    # Throttled link: the 1 MiB transfer takes ~4 s, so the kill lands in the middle of it.
    proxy = TcpProxy(e2e_broker.port, down_bytes_per_s=256 * 1024).start()
    restarted: BrokerHandle | None = None
    try:
        agent = start_fast_agent("dev-bk", broker=proxy.url)
        wait_until(lambda: _online(controller, "dev-bk"), 30, "hello")
        big = _padded(tmp_path / "big.tflite", OLD, 1 << 20)
        dep = controller.fleet.deploy(big, devices=["dev-bk"])
        start = proxy.bytes_down
        wait_until(lambda: proxy.bytes_down - start > 300_000, 60, "a third of the transfer")
        assert e2e_broker.pid is not None
        os.kill(e2e_broker.pid, sig)
        wait_until(lambda: not e2e_broker.is_running(), 20, "broker gone")
        assert _finished(controller, dep["id"]) is None, "the kill landed mid-transfer"
        proxy.down_bytes_per_s = None  # the throttle only had to place the kill mid-transfer
        restarted = start_mosquitto(
            e2e_broker.data_dir, port=e2e_broker.port, persistence=_persistence(e2e_broker)
        )
        row = wait_until(lambda: _finished(controller, dep["id"]), 120, "deployment after restart")
        _assert_one_terminal_result(controller, "dev-bk", row, agent.log())
        assert row["state"] == "succeeded", agent.log()[-3000:]
        assert controller.fleet.device("dev-bk")["model_sha256"] == _sha(big)
        assert agent.alive and agent.starts == 1
    finally:
        proxy.stop()
        if restarted is not None:
            restarted.stop()


def _persistence(handle: BrokerHandle) -> bool:
    """Whether a mosquitto ran with persistence (read back from its generated config)."""
    assert handle.data_dir is not None
    return "persistence true" in (handle.data_dir / "mosquitto.conf").read_text()


def _padded(target: Path, model: Path, extra: int) -> Path:
    """A real model padded with `extra` trailing bytes: many chunks, and it still loads."""
    shutil.copyfile(model, target)
    pattern = bytes(range(256))
    with target.open("ab") as fh:
        fh.write(pattern * (extra // len(pattern)))
    return target


# =========================================================================== cut links


_RECONNECTED = re.compile(r"reconnected with (\d+) of (\d+) chunks verified")
_RESUMING = re.compile(r"resuming with (\d+) of (\d+) chunks")
_ASKING = re.compile(r"asking for (\d+) of \d+ chunks")
_COMPLETE = re.compile(r"complete: (\d+) of (\d+) chunks fetched now, (\d+) resumed from disk")


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "seconds"), [("reset", 30.0), ("stall", 45.0)])
def test_link_cut_mid_download_resumes_from_the_bitmap(
    mode: str,
    seconds: float,
    controller: RunningController,
    e2e_broker: BrokerHandle,
    start_fast_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    """A 30-45 s outage mid-download: the agent keeps its chunks and fetches only the rest."""
    # Throttled until the cut (2 MiB in ~8 s), so the cut surely lands mid-download.
    proxy = TcpProxy(e2e_broker.port, down_bytes_per_s=256 * 1024).start()
    try:
        agent = start_fast_agent("dev-cut", broker=proxy.url)
        wait_until(lambda: _online(controller, "dev-cut"), 30, "hello")
        big = _padded(tmp_path / "big.tflite", OLD, 2 << 20)  # 33 chunks of 64 KiB
        before = controller.service.chunks_published
        dep = controller.fleet.deploy(big, devices=["dev-cut"])
        bitmap = agent.config.downloads_dir / f"{_sha(big)}.chunks.json"
        wait_until(bitmap.exists, 60, "8 chunks verified (the first saved bitmap)")
        proxy.cut(mode)
        proxy.down_bytes_per_s = None
        time.sleep(seconds)
        assert _finished(controller, dep["id"]) is None, "nothing completes while the link is cut"
        proxy.restore()
        row = wait_until(lambda: _finished(controller, dep["id"]), 180, "deployment after the cut")
        assert row["state"] == "succeeded", agent.log()[-3000:]
        _assert_one_terminal_result(controller, "dev-cut", row, agent.log())
        log = agent.log()
        total = -(-big.stat().st_size // (64 * 1024))
        # The agent never asked for the whole artifact again, only for its gaps.
        asked = [int(m.group(1)) for m in _ASKING.finditer(log)]
        assert all(n < total for n in asked), f"chunks asked for: {asked}"
        if mode == "reset":  # the new connection started from the chunks already verified
            have = [int(m.group(1)) for m in _RECONNECTED.finditer(log)]
            assert have and 8 <= have[0] < total, f"verified chunks at reconnect: {have}"
        else:  # the dead link was noticed as silence: gaps were asked for, with backoff
            assert asked, "no repair request during the stall"
        # Published once (retained) plus what the agent asked for again: less than twice.
        resent = controller.service.chunks_published - before - total
        assert resent < total, f"the controller re-published {resent} of {total} chunks"
        assert agent.alive and agent.starts == 1
    finally:
        proxy.stop()


def test_agent_killed_mid_download_resumes_from_its_bitmap(
    controller: RunningController,
    e2e_broker: BrokerHandle,
    start_fast_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    """SIGKILL while chunks stream in: the restarted agent resumes from the bitmap on disk."""
    proxy = TcpProxy(e2e_broker.port).start()
    try:
        agent = start_fast_agent("dev-rs", broker=proxy.url)
        wait_until(lambda: _online(controller, "dev-rs"), 30, "hello")
        big = _padded(tmp_path / "big.tflite", OLD, 2 << 20)
        total = -(-big.stat().st_size // (64 * 1024))
        proxy.cut_after(1_200_000, "stall")  # ~18 chunks delivered, then a black hole
        dep = controller.fleet.deploy(big, devices=["dev-rs"])
        assert proxy.cut_done.wait(60), "the transfer never reached the cut"
        bitmap = agent.config.downloads_dir / f"{_sha(big)}.chunks.json"
        wait_until(bitmap.exists, 30, "a saved chunk bitmap")
        agent.kill()
        proxy.restore()
        agent.start()
        row = wait_until(lambda: _finished(controller, dep["id"]), 120, "deployment after restart")
        assert row["state"] == "succeeded", agent.log()[-3000:]
        _assert_one_terminal_result(controller, "dev-rs", row, agent.log())
        resumed = [int(m.group(1)) for m in _RESUMING.finditer(agent.log())]
        assert resumed and 0 < resumed[0] < total, f"resumed chunks: {resumed}"
        complete = [m.groups() for m in _COMPLETE.finditer(agent.log())]
        fetched_after_restart = int(complete[-1][0])
        assert fetched_after_restart == total - resumed[0] < total
    finally:
        proxy.stop()


# =========================================================================== scripted controller


class ScriptedController(MqttProbe):
    """The controller's half of the wire, scripted: retained manifests and desired, chunks on need.

    `tamper(sha, index, attempt, data)` decides what each requested delivery of a chunk carries
    (None withholds it); `needs` logs every repair request in arrival order.
    """

    def __init__(self, broker: BrokerHandle, topic_root: str, device_id: str) -> None:
        """Prepare (not connect) a scripted controller for one device."""
        super().__init__(broker, client_id=f"scripted-{uuid.uuid4().hex[:8]}")
        self.topics = Topics(topic_root)
        self.device_id = device_id
        self.blobs: dict[str, tuple[Manifest, bytes]] = {}
        self.needs: list[tuple[str, tuple[int, ...]]] = []
        self.deliveries: Counter[tuple[str, int]] = Counter()
        self.tamper: Callable[[str, int, int, bytes], bytes | None] = lambda s, i, n, d: d
        self._serve_lock = threading.Lock()

    def open(self) -> ScriptedController:
        """Connect and subscribe to the device's events and status and to repair requests."""
        self.connect()
        self.subscribe(self.topics.events(self.device_id))
        self.subscribe(self.topics.status(self.device_id))
        self.subscribe(self.topics.all_needs())
        return self

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        """Collect every message; answer a repair request with the (tampered) chunks."""
        super()._on_message(client, userdata, message)
        parts = message.topic.split("/")
        if parts[-1] != "need":
            return
        sha, need = parts[-2], parse(bytes(message.payload), Need)
        with self._serve_lock:
            self.needs.append((sha, need.chunks))
            manifest, data = self.blobs[sha]
            for index in need.chunks:
                self.deliveries[(sha, index)] += 1
                start = index * manifest.chunk_size
                chunk = data[start : start + manifest.chunk_size]
                sent = self.tamper(sha, index, self.deliveries[(sha, index)], chunk)
                if sent is not None:  # publish without waiting: this is paho's network thread
                    self.client.publish(self.topics.chunk(sha, index), sent, qos=1)

    def offer(
        self, data: bytes, *, chunk_size: int = 4096, golden: bytes | None = None
    ) -> Manifest:
        """Publish the retained manifest of a blob (and of its golden blob) and remember both."""
        ref = None
        if golden is not None:
            gm = self._add(golden, chunk_size, "golden", None)
            ref = GoldenRef(gm.sha256, gm.size)
        return self._add(data, chunk_size, "fp32", ref)

    def _add(self, data: bytes, chunk_size: int, recipe: str, golden: GoldenRef | None) -> Manifest:
        """Build, remember and publish (retained) one manifest."""
        chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
        sha = hashlib.sha256(data).hexdigest()
        manifest = Manifest(
            sha256=sha,
            size=len(data),
            chunk_size=chunk_size,
            chunk_sha256=tuple(hashlib.sha256(c).hexdigest() for c in chunks),
            name="scripted",
            version=sha[:12],
            recipe=recipe,
            golden=golden,
        )
        self.blobs[sha] = (manifest, data)
        self.publish(self.topics.manifest(sha), dump(manifest), retain=True)
        return manifest

    def desire(self, generation: int, manifest: Manifest, **budgets: float) -> bytes:
        """Publish a retained desired state for `manifest`; return its payload (for replays)."""
        desired = Desired(
            generation=generation,
            deployment_id="dep-scripted",
            artifact=ArtifactRef(manifest.sha256, manifest.size, manifest.name, manifest.version),
            benchmark_runs=5,
            benchmark_warmup=1,
            **budgets,
        )
        payload = dump(desired)
        self.publish(self.topics.desired(self.device_id), payload, retain=True)
        return payload

    def command(self, command_id: str, action: str = "benchmark") -> None:
        """Send a one-shot command."""
        command = Command(command_id=command_id, action=action, runs=5, warmup=1)  # type: ignore[arg-type]
        self.publish(self.topics.cmd(self.device_id), dump(command))

    def events(self, **match: Any) -> list[dict[str, Any]]:
        """Every event received (duplicates included) whose fields equal `match`."""
        found = [m.json() for m in self.messages(self.topics.events(self.device_id))]
        return [e for e in found if all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, timeout: float = DEPLOY_TIMEOUT_S, **match: Any) -> dict[str, Any]:
        """The first event whose fields equal `match`, waiting for it."""

        def matches(m: ReceivedMessage) -> bool:
            event = m.json()
            return all(event.get(k) == v for k, v in match.items())

        return self.wait_for(self.topics.events(self.device_id), matches, timeout).json()

    def status(self) -> dict[str, Any]:
        """The latest online status."""
        found = [m.json() for m in self.messages(self.topics.status(self.device_id))]
        online = [s for s in found if s["online"]]
        assert online, "no online status yet"
        return online[-1]


@pytest.fixture
def scripted(
    e2e_broker: BrokerHandle, topic_root: str
) -> Iterator[Callable[[str], ScriptedController]]:
    """Factory: scripted(device_id) -> a connected ScriptedController, closed at teardown."""
    made: list[ScriptedController] = []

    def make(device_id: str) -> ScriptedController:
        ctl = ScriptedController(e2e_broker, topic_root, device_id).open()
        made.append(ctl)
        return ctl

    yield make
    for ctl in made:
        ctl.close()


def _activated(ctl: ScriptedController, generation: int) -> dict[str, Any]:
    """Wait for the activation of `generation` and its benchmark; return the activation."""
    event = ctl.wait_event(kind="update", state="active", generation=generation)
    ctl.wait_event(kind="benchmark", generation=generation)
    return event


def _restart(ctl: ScriptedController, agent: AgentProcess) -> None:
    """Stop and start the agent; return once it is subscribed again (a new online status)."""
    topic = ctl.topics.status(ctl.device_id)
    online = len([m for m in ctl.messages(topic) if m.json()["online"]])
    agent.terminate()
    agent.start()
    ctl.wait_for_count(topic, online + 1, lambda m: m.json()["online"], timeout=30)


def _serving_first(
    ctl: ScriptedController,
    start_fast_agent: Callable[..., AgentProcess],
    device_id: str,
    **cfg: Any,
) -> tuple[AgentProcess, Manifest]:
    """An agent serving OLD under generation 1 (the model that must keep serving)."""
    agent = start_fast_agent(device_id, **cfg)
    manifest = ctl.offer(OLD.read_bytes())
    ctl.desire(1, manifest)
    _activated(ctl, 1)
    return agent, manifest


def test_corrupt_chunk_is_rejected_fetched_again_and_the_file_verifies(
    scripted: Callable[[str], ScriptedController],
    start_fast_agent: Callable[..., AgentProcess],
) -> None:
    """A chunk with one flipped byte is refused, asked for alone again, and the file verifies."""
    ctl = scripted("dev-flip")
    agent = start_fast_agent("dev-flip")
    data = OLD.read_bytes()
    manifest = ctl.offer(data, chunk_size=1024)  # 12 chunks
    bad = 5

    def flip_once(sha: str, index: int, attempt: int, chunk: bytes) -> bytes:
        if index != bad or attempt > 1:
            return chunk
        flipped = bytearray(chunk)
        flipped[7] ^= 0xFF
        return bytes(flipped)

    ctl.tamper = flip_once
    ctl.desire(1, manifest)
    _activated(ctl, 1)
    needs = [chunks for sha, chunks in ctl.needs if sha == manifest.sha256]
    assert needs[0] == tuple(range(manifest.chunk_count))
    assert needs[1] == (bad,), f"only the corrupt chunk is asked for again: {needs}"
    assert ctl.deliveries[(manifest.sha256, bad)] == 2
    assert f"chunk {bad}: sha256 mismatch" in agent.log()
    assert agent.config.models_dir.joinpath(f"{manifest.sha256}.tflite").read_bytes() == data
    assert ctl.status()["model_sha256"] == manifest.sha256


def test_missing_last_chunk_times_out_cleanly_and_old_model_keeps_serving(
    scripted: Callable[[str], ScriptedController],
    start_fast_agent: Callable[..., AgentProcess],
) -> None:
    """A chunk that never comes: a clean `fetching` failure, then a retry fetches only it."""
    ctl = scripted("dev-last")
    agent, old = _serving_first(ctl, start_fast_agent, "dev-last", fetch_timeout_s=4.0)
    new = ctl.offer(NEW.read_bytes(), chunk_size=512)
    last = new.chunk_count - 1
    ctl.tamper = lambda sha, i, n, d: None if (sha, i) == (new.sha256, last) else d
    ctl.desire(2, new)
    error = ctl.wait_event(kind="error", generation=2, timeout=30)
    assert error["stage"] == "fetching", error
    assert f"1 of {new.chunk_count} chunks missing" in error["message"], error
    assert not ctl.events(kind="update", state="active", generation=2)
    assert len({e["event_id"] for e in ctl.events(kind="error", generation=2)}) == 1
    status = ctl.status()
    assert status["model_sha256"] == old.sha256 and status["state"] == "failed"
    ctl.command("bench-after-timeout")
    bench = ctl.wait_event(kind="benchmark", event_id="bench-after-timeout-bench", timeout=30)
    assert bench["benchmark"]["model_sha256"] == old.sha256, "the previous model still runs"

    # The controller retries under a new generation: only the withheld chunk is fetched.
    ctl.tamper = lambda sha, i, n, d: d
    asked_before = len(ctl.needs)
    ctl.desire(3, new)
    _activated(ctl, 3)
    assert ctl.needs[asked_before:][0] == (new.sha256, (last,)), ctl.needs[asked_before:]
    assert ctl.status()["model_sha256"] == new.sha256
    assert agent.alive


def test_latency_budget_from_desired_refuses_the_commit(
    scripted: Callable[[str], ScriptedController],
    start_fast_agent: Callable[..., AgentProcess],
) -> None:
    """The desired state's (profile's) budget, tighter than the agent's, blocks the commit."""
    ctl = scripted("dev-slow")
    agent, old = _serving_first(ctl, start_fast_agent, "dev-slow", latency_budget_ms=1000.0)
    new = ctl.offer(NEW.read_bytes())
    ctl.desire(2, new, latency_budget_ms=0.0001)  # tighter than the agent's own 1000 ms
    error = ctl.wait_event(kind="error", generation=2)
    assert error["stage"] == "self-testing", error
    assert "over budget 0.000 ms" in error["message"], error
    assert not ctl.events(kind="update", state="active", generation=2)
    assert ctl.status()["model_sha256"] == old.sha256
    assert not (agent.config.models_dir / f"{new.sha256}.tflite").exists(), "refused model removed"


def test_replayed_reordered_and_duplicated_input_has_one_effect(
    scripted: Callable[[str], ScriptedController],
    start_fast_agent: Callable[..., AgentProcess],
) -> None:
    """Replays, an older generation and repeated command ids (also across a restart): one effect."""
    ctl = scripted("dev-dup")
    agent = start_fast_agent("dev-dup")
    first = ctl.offer(OLD.read_bytes())
    payload = ctl.desire(5, first)
    _activated(ctl, 5)
    ctl.publish(ctl.topics.desired("dev-dup"), payload, retain=True)  # the same desired again
    older = ctl.offer(NEW.read_bytes())
    ctl.desire(3, older)  # an older generation after a newer one (and now the retained one)
    ctl.command("bench-1")
    ctl.command("bench-1")
    ctl.command("sync-1", "resend_status")
    ctl.wait_event(kind="command", event_id="sync-1")
    _restart(ctl, agent)
    ctl.command("bench-1")  # a redelivery across the restart
    ctl.command("sync-2", "resend_status")
    ctl.wait_event(kind="command", event_id="sync-2")

    assert len(ctl.events(kind="update", state="active", generation=5)) == 1
    assert len(ctl.events(kind="benchmark", generation=5)) == 1
    assert not ctl.events(generation=3), "the older generation was ignored"
    assert not [n for n in ctl.needs if n[0] == older.sha256], "nothing of it was fetched"
    assert len(ctl.events(kind="command", event_id="bench-1")) == 1
    assert len(ctl.events(kind="benchmark", event_id="bench-1-bench")) == 1
    status = ctl.status()
    assert status["model_sha256"] == first.sha256 and status["generation"] == 5
    assert agent.starts == 2


def test_corrupt_state_files_are_quarantined_and_the_agent_keeps_working(
    scripted: Callable[[str], ScriptedController],
    start_fast_agent: Callable[..., AgentProcess],
) -> None:
    """Torn update.json and pointers.json: quarantined, reported, rebuilt; the device heals."""
    ctl = scripted("dev-rot")
    agent, _ = _serving_first(ctl, start_fast_agent, "dev-rot")
    new = ctl.offer(NEW.read_bytes())
    ctl.desire(2, new)
    _activated(ctl, 2)
    update_json = agent.config.data_dir / "update.json"
    pointers_json = agent.config.models_dir / "pointers.json"

    agent.terminate()
    update_json.write_text('{"state": "fetch')  # torn write from some other tool
    agent.start()
    error = ctl.wait_event(kind="error", timeout=30)
    assert "update.json" in error["message"] and "not valid JSON" in error["message"], error
    assert update_json.with_name("update.json.corrupt").exists()
    wait_until(lambda: ctl.status()["model_sha256"] == new.sha256, 30, "serving NEW again")
    assert (
        len({e["event_id"] for e in ctl.events(kind="update", state="active", generation=2)}) == 1
    )

    agent.terminate()
    ctl.clear()
    update_json.write_text("[]")
    pointers_json.write_text('{"current": "../../etc/passwd"}')
    agent.start()
    messages = wait_until(
        lambda: len(errors := ctl.events(kind="error")) >= 2 and [e["message"] for e in errors],
        30,
        "two error events (update.json, pointers.json)",
    )
    joined = " | ".join(messages)
    assert "pointers.json was corrupt" in joined and "serving nothing" in joined, joined
    assert pointers_json.with_name("pointers.json.corrupt").exists()
    # The retained desired state heals the device: NEW is in the store, verified and activated.
    wait_until(lambda: ctl.status()["model_sha256"] == new.sha256, 60, "healed by desired")
    assert agent.alive and agent.starts == 3
