"""Property-based fuzzing of the controller's inbound path: ControllerService message handling.

The service is built but never started (no broker): each generated (topic, payload) goes
through `_handle_each` inside a transaction, as the service loop does, on a real SQLite fleet
that knows one device and one artifact. Nothing may count as an internal error; exactly the
inputs the protocol refuses count as rejected.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import Event, Hello, Need, ProtocolError, Status, Telemetry, dump, parse
from controller.fleet.registry import Fleet
from controller.runtime.service import ControllerService
from tests.paths import TEST_DATA
from tests.protocol_fuzz import (
    FUZZ,
    ROOT,
    TOPIC_LEVELS,
    TOPICS,
    VALID,
    mutated,
)

DATA = TEST_DATA
DEVICE = "rpi-01"  # the device id of every valid sample message
UNKNOWN_SHA = "ef" * 32

# Generated inputs for the controller path: with the agent-side module well over 10,000.
EXAMPLES = 1200


class RecordingSession:
    """The MqttSession interface the service uses, recording publishes instead of sending."""

    def __init__(self) -> None:
        """Nothing published yet."""
        self.published: list[tuple[str, bytes]] = []

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, wait_s: float = 0
    ) -> bool:
        """Record one publish."""
        self.published.append((topic, payload))
        return False


@pytest.fixture(scope="module")
def controller(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ControllerService, Fleet, str]]:
    """A never-started service over a fleet with one registered device and one artifact."""
    home = tmp_path_factory.mktemp("fuzz-controller")
    fleet = Fleet(home)
    fleet.register_device(DEVICE, "rpi4")
    manifest = fleet.add_artifact(DATA / "tiny_fp32.tflite", name="tiny", version="1")
    service = ControllerService(home, "mqtt://127.0.0.1:1", topic_root=ROOT)
    service.session = RecordingSession()  # type: ignore[assignment]
    # Rejections are logged as warnings by design; internal errors still show (ERROR).
    logging.getLogger("controller").setLevel(logging.ERROR)
    yield service, fleet, manifest.sha256
    logging.getLogger("controller").setLevel(logging.NOTSET)
    fleet.close()


def _cases(channel_topics: st.SearchStrategy[str], cls: type) -> st.SearchStrategy[Any]:
    """(topic, payload) pairs with a valid, mutated or junk payload of `cls`."""
    payload = (
        st.just(dump(VALID[cls]))
        | mutated(cls).map(lambda text: text.encode("utf-8", "surrogatepass"))
        | st.binary(max_size=120)
    )
    return st.tuples(channel_topics, payload)


def _device_topics(channel: str) -> st.SearchStrategy[str]:
    """The channel's topic for the sample device, or for another device (a mismatch)."""
    return st.sampled_from([TOPICS.device(DEVICE, channel), TOPICS.device("dev-other", channel)])


def _inbound(known_sha: str) -> st.SearchStrategy[tuple[str, bytes]]:
    """Every inbound channel of the controller, plus topics that are not the protocol's."""
    need_topics = st.sampled_from([TOPICS.need(known_sha), TOPICS.need(UNKNOWN_SHA)])
    return (
        _cases(_device_topics("hello"), Hello)
        | _cases(_device_topics("status"), Status)
        | _cases(_device_topics("events"), Event)
        | _cases(_device_topics("telemetry"), Telemetry)
        | _cases(need_topics, Need)
        | st.tuples(
            st.lists(TOPIC_LEVELS, max_size=5).map(lambda levels: "/".join([ROOT, *levels]))
            | st.text(max_size=60),
            st.binary(max_size=60),
        )
    )


# The message type the controller parses on each channel it handles.
CHANNEL_TYPES: dict[str, type] = {
    "hello": Hello,
    "status": Status,
    "events": Event,
    "telemetry": Telemetry,
    "need": Need,
}


def _refused_by_protocol(topic: str, payload: bytes, known_sha: str) -> bool:
    """Whether the controller must reject (topic, payload): bad topic, bad message, wrong id."""
    try:
        parsed = TOPICS.parse(topic)
    except ProtocolError:
        return True
    cls = CHANNEL_TYPES.get(parsed.channel)
    if cls is None or (parsed.channel == "status" and not payload):
        return False
    try:
        message: Any = parse(payload, cls)
    except ProtocolError:
        return True
    if parsed.channel == "need":
        return parsed.ident != known_sha  # an unknown artifact
    return bool(message.device_id != parsed.ident)


def test_inbound_messages_are_handled_or_rejected_never_crash(
    controller: tuple[ControllerService, Fleet, str],
) -> None:
    service, fleet, known_sha = controller
    needs: dict[str, set[int]] = {known_sha: set(), UNKNOWN_SHA: set()}
    first_need: dict[str, float] = {}
    generated = 0
    outcomes: Counter[tuple[str, bool]] = Counter()

    @settings(FUZZ, max_examples=EXAMPLES)
    @given(_inbound(known_sha))
    def run(case: tuple[str, bytes]) -> None:
        nonlocal generated
        generated += 1
        topic, payload = case
        errors, rejected = service.errors, service.rejected
        with fleet.db.transaction():
            service._handle_each(fleet, [case], needs, first_need)
        assert service.errors == errors, f"internal error on {topic!r}: see the log"
        refused = _refused_by_protocol(topic, payload, known_sha)
        assert service.rejected - rejected == int(refused)
        outcomes[topic.rsplit("/", 1)[-1], refused] += 1

    run()
    print(f"fuzzed controller inputs: {generated}")
    assert generated >= EXAMPLES // 2
    for channel in CHANNEL_TYPES:  # not vacuous: every channel saw accepted and refused input
        assert outcomes[channel, False] and outcomes[channel, True], (channel, outcomes)
    assert needs[known_sha] <= {0}, "only chunk indices of the known one-chunk artifact are kept"
