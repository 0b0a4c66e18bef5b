"""The embedded broker of `edgefleet up` and the demo: mosquitto when installed, else amqtt."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from controller.brokers.base import BrokerError, BrokerHandle, is_loopback
from controller.brokers.mosquitto import find_mosquitto, start_mosquitto
from controller.security.broker_config import start_secure_mosquitto

if TYPE_CHECKING:
    from controller.security.identity import FleetSecurity

log = logging.getLogger(__name__)


def start_embedded(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    prefer: str = "auto",
    security: FleetSecurity | None = None,
    tls_port: int = 8883,
    cert_port: int | None = None,
) -> BrokerHandle:
    """Start the demo broker: mosquitto (with persistence) when installed, else amqtt in-process.

    Beyond loopback devices must authenticate: mosquitto then runs the secured config from
    `security` (password file, per-device ACLs, TLS on `tls_port`, plaintext `port` moved to
    loopback for the controller; docs/security.md); amqtt refuses (it cannot do that safely).
    """
    if prefer not in ("auto", "mosquitto", "amqtt"):
        raise ValueError(f"unknown broker {prefer!r}: expected 'auto', 'mosquitto' or 'amqtt'")
    binary = find_mosquitto() if prefer in ("auto", "mosquitto") else None
    if prefer == "mosquitto" or (prefer == "auto" and binary is not None):
        if not is_loopback(host):
            return _start_secured(data_dir, host, port, security, tls_port, cert_port, binary)
        # Persistence keeps retained device status across a controller (and broker) restart.
        return start_mosquitto(data_dir, host=host, port=port, persistence=True, binary=binary)
    if prefer == "auto":
        log.info("mosquitto not found; using the in-process amqtt broker (MQTT 3.1.1 only)")
    from controller.brokers.amqtt_broker import (
        start_amqtt,  # amqtt is not installed on every machine
    )

    return start_amqtt(host=host, port=port)


def _start_secured(
    data_dir: Path,
    host: str,
    port: int,
    security: FleetSecurity | None,
    tls_port: int,
    cert_port: int | None,
    binary: str | None,
) -> BrokerHandle:
    """The embedded mosquitto beyond loopback: authenticated, ACL-confined, TLS for devices."""
    if security is None:
        raise BrokerError(
            f"listening on {host} requires device authentication: pass the fleet's security "
            "(controller.security.identity.FleetSecurity(home)) so the broker gets the password "
            "file, ACLs and TLS certificate, or listen on 127.0.0.1"
        )
    return start_secure_mosquitto(
        security,
        data_dir,
        host=host,
        plain_port=port,
        tls_port=tls_port,
        cert_port=cert_port,
        persistence=True,
        binary=binary,
    )
