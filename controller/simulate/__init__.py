"""`edgefleet simulate`: many simulated agents in one process, speaking the real wire protocol.

Each simulated agent holds its own MQTT connection (client id = device id) and follows its
retained desired state the way agent/update/flow.py does, without a model runtime: chunks are hashed
for real, self-test and benchmark figures are synthesized from the device profile
(docs/simulate.md). Every connection is driven from one epoll loop in one thread: paho's
loop_start() costs a thread per client and its select() cannot see fds past 1024, which made
~340 clients the silent ceiling.
"""

from __future__ import annotations

from controller.simulate.faults import (
    NO_FAULTS,
    Faults,
    FaultSpec,
    SimulationError,
    assign_faults,
    parse_fault,
)
from controller.simulate.figures import LATENCY_SHAPE, synth_figures, synth_report
from controller.simulate.loop import Simulation
from controller.simulate.speed import NO_SPEED, SpeedModel, SpeedSpec, parse_speed

__all__ = [
    "LATENCY_SHAPE",
    "NO_FAULTS",
    "NO_SPEED",
    "FaultSpec",
    "Faults",
    "Simulation",
    "SimulationError",
    "SpeedModel",
    "SpeedSpec",
    "assign_faults",
    "parse_fault",
    "parse_speed",
    "synth_figures",
    "synth_report",
]
