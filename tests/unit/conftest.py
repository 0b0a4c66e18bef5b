"""Unit-tier fixtures shared by the agent and controller folders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import Agent
from agent.protocol.config import AgentConfig
from tests.memory_agent import ROOT, MemoryBroker


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[..., tuple[Agent, MemoryBroker]]]:
    """Factory: a restored Agent over tmp_path (a new one = the same device after a restart)."""

    def make(broker: MemoryBroker | None = None, **overrides: Any) -> tuple[Agent, MemoryBroker]:
        settings: dict[str, Any] = {"threads": 1, "repair_interval_s": 0.2, **overrides}
        config = AgentConfig(
            device_id="dev-u", data_dir=tmp_path / "agent", topic_root=ROOT, **settings
        )
        broker = broker or MemoryBroker()
        agent = Agent(config, session=broker)  # type: ignore[arg-type]
        broker.deliver = agent.router.on_message
        agent.restore()
        return agent, broker

    yield make
