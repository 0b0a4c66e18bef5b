"""Unit tests of `controller.security`."""
