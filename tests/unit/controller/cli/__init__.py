"""Unit tests of `controller.cli`."""
