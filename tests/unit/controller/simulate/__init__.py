"""Unit tests of `controller.simulate`."""
