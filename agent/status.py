"""What the agent says about itself: the hello (facts) and the retained status message."""

from __future__ import annotations

from agent import __version__
from agent.facts import device_facts
from agent.fsutil import CorruptFileError
from agent.protocol import Hello, Status
from agent.protocol.config import AgentConfig
from agent.store import ModelStore
from agent.update.record import UpdateRecord


def build_hello(config: AgentConfig) -> Hello:
    """Registration with the device's facts, sent on every connect."""
    return Hello(
        device_id=config.device_id,
        agent_version=__version__,
        facts=device_facts(),
        profile=config.profile,
    )


def build_status(
    config: AgentConfig,
    record: UpdateRecord,
    store: ModelStore,
    serving_sha256: str | None,
    *,
    online: bool,
) -> Status:
    """The status of the saved record; offline (the last will) names the stored `current`."""
    try:
        pointers = store.pointers()
        current, previous = pointers.current, pointers.previous
    except CorruptFileError:
        current = previous = None  # rebuilt by the restore; until then claim nothing
    return Status(
        device_id=config.device_id,
        online=online,
        state=record.state,
        model_sha256=serving_sha256 if online else current,
        previous_sha256=previous,
        generation=record.applied_generation,
        detail=record.detail[:500],
    )
