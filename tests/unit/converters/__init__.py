"""Unit tests of `converters`."""
