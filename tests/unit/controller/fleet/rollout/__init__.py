"""Unit tests of `controller.fleet.rollout`."""
