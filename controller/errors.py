"""The controller's one user-facing error type (the CLI prints it and exits 2)."""

from __future__ import annotations


class FleetError(ValueError):
    """A request about an unknown device, profile, model or deployment, or bad input."""
