"""Unit tests of `firmware_profiles`."""
