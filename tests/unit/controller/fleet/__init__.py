"""Unit tests of `controller.fleet`."""
