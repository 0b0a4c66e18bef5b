"""Unit tests of `controller.storage`."""
