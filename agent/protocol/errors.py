"""Errors raised by the wire protocol: one type, always naming what is wrong."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A topic, id or message that breaks the wire contract; the text names the field or part."""
