"""Unit tests of `agent`."""
