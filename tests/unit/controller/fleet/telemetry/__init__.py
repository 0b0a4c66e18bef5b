"""Unit tests of `controller.fleet.telemetry`."""
