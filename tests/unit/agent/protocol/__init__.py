"""Unit tests of `agent.protocol`."""
