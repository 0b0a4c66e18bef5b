"""Property-based fuzzing of every wire parser and of the agent's message routing.

Three kinds of input per message type: arbitrary bytes, arbitrary JSON values, and mutations of
a valid message (fields dropped, added, renamed or retyped; huge, negative and non-finite
numbers; deep nesting; long, unicode, path-like and control-character strings). `parse` must
return a message that re-dumps and re-parses to itself, or raise ProtocolError: anything else
is a crash. Derandomized, so CI sees the same inputs every run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.daemon import Agent
from agent.protocol import (
    Command,
    Desired,
    Manifest,
    Need,
    ProtocolError,
    SeqRange,
    Status,
    dump,
    parse,
)
from agent.protocol.config import AgentConfig
from agent.protocol.limits import MAX_CHUNK_SIZE
from agent.protocol.schema import encode
from tests.protocol_fuzz import (
    EVIL_VALUES,
    EXAMPLES,
    FUZZ,
    JSON_VALUES,
    MESSAGE_TYPES,
    OTHER_SHA,
    ROOT,
    SHA,
    TOPIC_LEVELS,
    TOPICS,
    VALID,
    mutated,
    to_json,
)

pytestmark = pytest.mark.agent

# The issue asks for at least this many generated inputs across the module.
REQUIRED_TOTAL = 10_000

EXAMPLES_RUN: Counter[str] = Counter()


def check_parse(payload: bytes | str, cls: type) -> bool:
    """Parse strictly: a message must round-trip, anything else must be a ProtocolError.

    Returns whether the payload was accepted.
    """
    try:
        message: Any = parse(payload, cls)
    except ProtocolError as exc:
        assert str(exc), "a rejection must say what is wrong"
        return False
    assert isinstance(message, cls)
    assert parse(dump(message), cls) == message
    return True


def test_valid_samples_round_trip() -> None:
    for cls, message in VALID.items():
        assert check_parse(dump(message), cls), cls.__name__


def test_mutations_reach_both_outcomes() -> None:
    """The mutation strategy is not vacuous: it produces accepted and rejected inputs."""
    outcomes: Counter[bool] = Counter()

    @settings(FUZZ, max_examples=400)
    @given(st.sampled_from(MESSAGE_TYPES).flatmap(lambda c: st.tuples(st.just(c), mutated(c))))
    def run(case: tuple[type, str]) -> None:
        outcomes[check_parse(case[1], case[0])] += 1

    run()
    assert outcomes[True] >= 10 and outcomes[False] >= 100, outcomes


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_arbitrary_bytes_parse_or_reject(cls: type) -> None:
    @FUZZ
    @given(st.binary(max_size=600) | st.binary(max_size=40).map(lambda b: b'{"v":1,' + b))
    def run(payload: bytes) -> None:
        EXAMPLES_RUN["bytes"] += 1
        check_parse(payload, cls)

    run()


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_arbitrary_json_parse_or_reject(cls: type) -> None:
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    shaped = st.dictionaries(st.sampled_from(names) | st.text(max_size=8), EVIL_VALUES, max_size=8)

    @FUZZ
    @given(JSON_VALUES | shaped | shaped.map(lambda d: {**d, "v": 1}))
    def run(value: Any) -> None:
        EXAMPLES_RUN["json"] += 1
        check_parse(to_json(value), cls)

    run()


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_mutated_messages_parse_or_reject(cls: type) -> None:
    @FUZZ
    @given(mutated(cls), st.booleans())
    def run(text: str, as_bytes: bool) -> None:
        EXAMPLES_RUN["mutated"] += 1
        check_parse(text.encode("utf-8", "surrogatepass") if as_bytes else text, cls)

    run()


@settings(FUZZ, max_examples=2 * EXAMPLES)
@given(
    st.lists(TOPIC_LEVELS, max_size=6).map(lambda levels: "/".join([ROOT, *levels]))
    | st.text(max_size=80)
)
def test_topic_parse_or_reject(topic: str) -> None:
    EXAMPLES_RUN["topics"] += 1
    try:
        parsed = TOPICS.parse(topic)
    except ProtocolError:
        return
    if parsed.kind == "device":
        rebuilt = TOPICS.device(parsed.ident, parsed.channel)
    elif parsed.channel == "chunks":
        assert parsed.index is not None and parsed.index >= 0
        rebuilt = TOPICS.chunk(parsed.ident, parsed.index)
    elif parsed.channel == "manifest":
        rebuilt = TOPICS.manifest(parsed.ident)
    else:
        rebuilt = TOPICS.need(parsed.ident)
    assert TOPICS.parse(rebuilt) == parsed


class RecordingSession:
    """The MqttSession interface the agent uses, recording publishes instead of sending them."""

    def __init__(self) -> None:
        """Connected, nothing published yet."""
        self.connected = threading.Event()
        self.connected.set()
        self.published: list[tuple[str, bytes]] = []

    def start(self) -> None:
        """Nothing to connect."""

    def stop(self) -> None:
        """Nothing to disconnect."""

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, wait_s: float = 0
    ) -> bool:
        """Record one publish."""
        self.published.append((topic, payload))
        return False

    def subscribe(self, *topics: str) -> None:
        """Nothing to subscribe."""

    def unsubscribe(self, *topics: str) -> None:
        """Nothing to unsubscribe."""


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, RecordingSession]]:
    """A restored agent over a temporary data dir, never started, publishing into a recorder."""
    config = AgentConfig(
        device_id="dev-fuzz", data_dir=tmp_path_factory.mktemp("fuzz") / "agent", topic_root=ROOT
    )
    session = RecordingSession()
    agent = Agent(config, session=session)  # type: ignore[arg-type]
    agent.restore()
    # Rejections are logged as warnings by design; thousands of them would only slow the run.
    logging.getLogger("agent").setLevel(logging.ERROR)
    yield agent, session
    logging.getLogger("agent").setLevel(logging.NOTSET)


def _routed_payloads(topic: st.SearchStrategy[str], cls: type) -> st.SearchStrategy[Any]:
    """(topic, payload) pairs whose payload is valid, mutated or junk for the topic's type."""
    payload = (
        st.just(dump(VALID[cls]))
        | mutated(cls).map(lambda t: t.encode("utf-8", "surrogatepass"))
        | st.binary(max_size=200)
    )
    return st.tuples(topic, payload)


ROUTED = (
    _routed_payloads(
        st.sampled_from([TOPICS.desired("dev-fuzz"), TOPICS.desired("other")]), Desired
    )
    | _routed_payloads(st.just(TOPICS.cmd("dev-fuzz")), Command)
    | _routed_payloads(
        st.sampled_from([TOPICS.manifest(SHA), TOPICS.manifest(OTHER_SHA)]), Manifest
    )
    | st.tuples(
        st.sampled_from([TOPICS.chunk(SHA, 0), TOPICS.chunk(SHA, 10**6)]),
        st.binary(max_size=100) | st.just(b"x" * (MAX_CHUNK_SIZE + 1)),
    )
    | st.tuples(
        st.lists(TOPIC_LEVELS, max_size=5).map(lambda levels: "/".join([ROOT, *levels]))
        | st.text(max_size=60),
        st.binary(max_size=100),
    )
)


def _rejected_by_protocol(topic: str, payload: bytes) -> bool:
    """Whether the agent must reject (topic, payload): the routing rules of Router.on_message."""
    try:
        parsed = TOPICS.parse(topic)
        if parsed.channel == "manifest" and payload:
            if parse(payload, Manifest).sha256 != parsed.ident:
                return True
        elif parsed.channel == "desired":
            parse(payload, Desired)
        elif parsed.channel == "cmd":
            parse(payload, Command)
    except ProtocolError:
        return True
    return False


def test_agent_routing_never_raises_and_counts_each_rejection(
    agent: tuple[Agent, RecordingSession],
) -> None:
    daemon, session = agent
    outcomes: Counter[bool] = Counter()

    @settings(FUZZ, max_examples=3 * EXAMPLES)
    @given(ROUTED)
    def run(case: tuple[str, bytes]) -> None:
        EXAMPLES_RUN["agent-routing"] += 1
        topic, payload = case
        before = daemon.counters.rejected_messages
        published = len(session.published)
        daemon.router.on_message(topic, payload)
        rejected = daemon.counters.rejected_messages - before
        assert rejected == int(_rejected_by_protocol(topic, payload))
        events = [json.loads(p) for t, p in session.published[published:] if t.endswith("/events")]
        assert [e["kind"] for e in events] == ["rejected"] * rejected
        outcomes[bool(rejected)] += 1
        while not daemon.inbox.queue.empty():  # the work thread never runs here: keep memory flat
            daemon.inbox.queue.get_nowait()

    run()
    assert outcomes[True] >= 100 and outcomes[False] >= 100, outcomes  # both paths exercised


# One valid sample of every command action, in the signed form the controller sends (issue 21):
# addressed to the fuzzed device, with a counter, an expiry and a signature slot.
COMMAND_SAMPLES = {
    "benchmark": Command("cmd-b", "benchmark", 10_000, 1_000, device_id="dev-fuzz", counter=7),
    "rollback": Command("cmd-r", "rollback", device_id="dev-fuzz", counter=8, expires=2e9),
    "resend_status": Command("cmd-s", "resend_status", device_id="dev-fuzz", counter=9),
    "resend_telemetry": Command(
        "cmd-t", "resend_telemetry", seq_ranges=(SeqRange(1, 4),), device_id="dev-fuzz", counter=10
    ),
}


@pytest.mark.parametrize("action", sorted(COMMAND_SAMPLES))
def test_every_command_parse_or_reject(action: str) -> None:
    """Structure-aware mutations of each command action (numbers at their bounds included)."""
    sample = COMMAND_SAMPLES[action]
    assert check_parse(dump(sample), Command)

    @FUZZ
    @given(mutated(Command, sample), st.booleans())
    def run(text: str, as_bytes: bool) -> None:
        EXAMPLES_RUN["commands"] += 1
        check_parse(text.encode("utf-8", "surrogatepass") if as_bytes else text, Command)

    run()


@pytest.mark.parametrize("action", sorted(COMMAND_SAMPLES))
def test_enforcing_agent_queues_only_the_signed_command(
    action: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With trusted keys, no mutation of a signed command is ever queued: each one is refused
    (malformed: `rejected`; signature, device, expiry, replay: `security`), never raised."""
    pytest.importorskip("cryptography")
    from controller.security.signing import FleetSigner, sign_command

    directory = tmp_path_factory.mktemp("fuzz-signed")
    signer = FleetSigner.load_or_create(directory / "security")
    config = AgentConfig(
        device_id="dev-fuzz",
        data_dir=directory / "agent",
        topic_root=ROOT,
        trusted_keys=(signer.public_b64,),
    )
    session = RecordingSession()
    daemon = Agent(config, session=session)  # type: ignore[arg-type]
    daemon.restore()
    signed = sign_command(signer, COMMAND_SAMPLES[action], "dev-fuzz")
    topic = TOPICS.cmd("dev-fuzz")
    daemon.router.on_message(topic, dump(signed))
    assert daemon.inbox.queue.get_nowait() == signed  # the untouched signed command is accepted
    outcomes: Counter[str] = Counter()
    logging.getLogger("agent").setLevel(logging.ERROR)
    try:

        @FUZZ
        @given(mutated(Command, signed))
        def run(text: str) -> None:
            EXAMPLES_RUN["signed-commands"] += 1
            before = daemon.counters.rejected_messages
            published = len(session.published)
            daemon.router.on_message(topic, text.encode("utf-8", "surrogatepass"))
            assert daemon.inbox.queue.empty(), f"queued a forged command: {text[:200]}"
            events = [
                json.loads(p) for t, p in session.published[published:] if t.endswith("/events")
            ]
            kinds = [e["kind"] for e in events]
            if daemon.counters.rejected_messages == before:
                assert not kinds  # the same command id again: ignored, nothing to report
                outcomes["ignored"] += 1
            else:
                assert kinds in (["rejected"], ["security"]), kinds
                outcomes[kinds[0]] += 1

        run()
    finally:
        logging.getLogger("agent").setLevel(logging.NOTSET)
    assert outcomes["security"] and outcomes["rejected"], outcomes


# Inputs that crashed a parser before the fixes in agent/protocol (each was an uncaught error).
CRASHERS = [
    ("[" * 100_000, Need, "nested too deeply"),  # RecursionError in json.loads
    ('{"v":1,"device_id":"d","chunks":[' + "9" * 5000 + "]}", Need, "not valid JSON"),  # ValueError
    ('{"v":1,"device_id":"d","chunks":[' + "9" * 30 + "]}", Need, "64-bit"),  # SQLite overflow
    (  # OverflowError converting an integer to float
        '{"v":1,"generation":1,"deployment_id":"d","artifact":null,"latency_budget_ms":1'
        + "0" * 400
        + "}",
        Desired,
        "must be finite",
    ),
    ('{"v":1,"device_id":"d","online":true,"detail":"\\ud800"}', Status, "not valid Unicode"),
]


@pytest.mark.parametrize("payload, cls, reason", CRASHERS, ids=[c[2] for c in CRASHERS])
def test_former_crashers_are_clean_rejections(payload: str, cls: type, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse(payload, cls)


@pytest.mark.parametrize("field", ["v", "generation", "deployment_id"])
def test_rejection_of_a_huge_value_has_a_short_message(field: str) -> None:
    document = encode(VALID[Desired])
    document[field] = [[1] * 20_000]  # 120 KB, under the size cap
    with pytest.raises(ProtocolError) as caught:
        parse(json.dumps(document), Desired)
    assert len(str(caught.value)) < 300, "the error is logged and sent as an event"


def test_unicode_digit_chunk_index_is_a_clean_rejection() -> None:
    with pytest.raises(ProtocolError, match="bad chunk index"):
        TOPICS.parse(f"{ROOT}/artifacts/{SHA}/chunks/²")  # isdigit() yes, int() ValueError


def test_at_least_ten_thousand_inputs_were_generated(request: pytest.FixtureRequest) -> None:
    """Runs last in the module: the sum of examples every fuzz test above actually ran."""
    total = sum(EXAMPLES_RUN.values())
    print(f"fuzzed inputs: {total} ({dict(EXAMPLES_RUN)})")
    fuzz_tests = {
        f"test_{kind}_parse_or_reject[{cls.__name__}]"
        for kind in ("arbitrary_bytes", "arbitrary_json", "mutated_messages")
        for cls in MESSAGE_TYPES
    } | {"test_topic_parse_or_reject", "test_agent_routing_never_raises_and_counts_each_rejection"}
    module = request.module
    selected = {
        item.name for item in request.session.items if getattr(item, "module", None) is module
    }
    if not fuzz_tests <= selected:  # a -k selection ran only some of the fuzz tests
        pytest.skip(f"{len(fuzz_tests - selected)} fuzz tests not selected; total {total}")
    assert total >= REQUIRED_TOTAL
