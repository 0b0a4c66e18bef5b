"""Unit tests of `agent.update`."""
