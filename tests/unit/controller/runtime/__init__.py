"""Unit tests of `controller.runtime`."""
